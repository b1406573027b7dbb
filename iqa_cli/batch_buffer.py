"""Batch tensors that DataLoader workers allocate straight in shared memory."""

from __future__ import annotations

import math

import torch


def batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, allocated in shared memory right away.

    A batch built in ordinary memory is copied into shared memory when the worker hands it over (as
    `default_collate` avoids too): for 16 images at 448 px that is 38 MB more to write per batch.
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)
