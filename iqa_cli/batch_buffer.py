"""Batch tensors that DataLoader workers allocate straight in shared memory, and reuse."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

_filling: _Filling | None = None  # in a worker, inside `BatchPool.filling()`: the slot batch_buffer draws from


def batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory right away (reused from the worker's
    `BatchPool` when its collate runs inside `BatchPool.filling`).

    A batch built in ordinary memory is copied into shared memory when the worker hands it over (as
    `default_collate` avoids too): for 16 images at 448 px that is 38 MB more to write per batch.
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    if _filling is not None:
        return _filling.take(shape, dtype)
    return _view(_new_shared(math.prod(shape) * dtype.itemsize), shape, dtype)


def _new_shared(nbytes: int) -> torch.UntypedStorage:
    return torch.UntypedStorage._new_shared(max(1, nbytes))


def _view(storage: torch.UntypedStorage, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class BatchPool:
    """Shared-memory blocks that each DataLoader worker builds its batches in and reuses once the main process
    is done with them.

    A fresh block per batch is paid in page faults (the worker's first write to every page, the main process
    mapping it again) and a file to create and free: ~1.8 ms of CPU per 448 px float32 image, more than the
    normalization itself (BENCHMARKS.md). Each worker keeps a ring of `depth` slots; a batch built in a slot
    carries a stamp `(worker, sequence, new blocks)` under `STAMP`, and the main process calls `release(batch)`
    when it no longer reads it. A worker reuses a slot only when the batch that last used it was released, else
    it builds in a new block: it never waits and never writes into a batch still in use.

    With `depth = prefetch_factor + 1` and the DataLoader's round-robin order, a worker starting its batch `s`
    finds batch `s - depth` released whenever the main process releases each batch before taking the next.

    The release counters are a shared-memory tensor, not a multiprocessing lock, so the pool works with any
    DataLoader start method (a lock made in one context cannot be sent to workers of another). A counter only
    grows: a worker that reads a stale value allocates a new block, nothing worse. Between its last read of a
    batch and the store that releases it, the main process has run torch operators, which release and retake
    the GIL (a mutex, so the reads are complete before the store is seen, on weakly ordered CPUs too).
    """

    STAMP = "pool_stamp"

    def __init__(self, workers: int, depth: int):
        self.depth = depth
        self.released = torch.zeros(max(1, workers), dtype=torch.int64).share_memory_()
        self._slots: list[list[torch.UntypedStorage]] = []  # filled in each worker process, its own
        self._sequence = 0  # this worker's batches so far

    @contextlib.contextmanager
    def filling(self) -> Iterator[_Filling | None]:
        """In a worker: `batch_buffer` calls inside draw from this worker's next slot; yields the draw, whose
        `stamp()` the batch carries. In the main process (no workers) it changes nothing and yields None."""
        global _filling
        info = torch.utils.data.get_worker_info()
        if info is None:
            yield None
            return
        sequence, self._sequence = self._sequence, self._sequence + 1
        if not self._slots:
            self._slots = [[] for _ in range(self.depth)]
        done = int(self.released[info.id])
        reusable = done >= sequence - self.depth + 1  # the slot's previous batch, sequence - depth, is released
        _filling = _Filling(self._slots[sequence % self.depth], reusable, info.id, sequence)
        try:
            yield _filling
        finally:
            _filling = None

    def release(self, batch: dict[str, Any]) -> None:
        """Main process: `batch` is no longer read; its worker may build a later batch in its block."""
        stamp = batch.get(self.STAMP)
        if stamp is not None:
            worker, sequence, _ = stamp
            self.released[worker] = max(int(self.released[worker]), sequence + 1)  # the main process's alone


class _Filling:
    """One collate call's draw from a slot: the slot's k-th block for the call's k-th `batch_buffer`."""

    def __init__(self, blocks: list[torch.UntypedStorage], reusable: bool, worker: int, sequence: int):
        self.blocks, self.reusable, self.worker, self.sequence = blocks, reusable, worker, sequence
        self.taken = self.allocated = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        k, self.taken = self.taken, self.taken + 1
        nbytes = math.prod(shape) * dtype.itemsize
        if self.reusable and k < len(self.blocks) and self.blocks[k].nbytes() >= nbytes:
            return _view(self.blocks[k], shape, dtype)
        storage = _new_shared(nbytes)  # the old block, if any, lives on while the main process holds it
        if k < len(self.blocks):
            self.blocks[k] = storage
        else:
            self.blocks.append(storage)
        self.allocated += 1
        return _view(storage, shape, dtype)

    def stamp(self) -> tuple[int, int, int]:
        """(worker, sequence, blocks newly allocated): what `BatchPool.release` reads, and how well reuse works."""
        return (self.worker, self.sequence, self.allocated)
