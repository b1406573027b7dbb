"""Batches for the model: DataLoader workers stream units, decode and transform each sample, and collate batches of
one fixed shape in shared memory. Knows sources and scorers, not the command's options.

Each DataLoader worker takes a strided share of the units (`units[worker::workers]`) and streams them in order,
building whole batches; a batch says which rows of which unit it holds and which units ended in it, so the main
process can write each unit as soon as it is complete (`iqa_cli.scoring.store.UnitWriter`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iqa_cli import interrupts
from iqa_cli.batch_buffer import BatchPool
from iqa_cli.errors import UserError
from iqa_cli.process import cores
from iqa_cli.sources import Sample, Source, SourceError

PREFETCH = 2  # batches each DataLoader worker builds ahead


def model_threads(device: torch.device, workers: int, local_world_size: int, current: int) -> int | None:
    """torch's intra-op threads for a CPU model while `workers` processes decode: the cores they leave (at
    least one, at most torch's `current` setting, which counts physical cores). None (leave torch's setting)
    on a GPU or when the user set OMP_NUM_THREADS: torch's default of one thread per core makes the model's
    threads and the workers fight over the same cores."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    return min(current, max(1, cores() // local_world_size - workers))


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch.set_num_threads(threads) for the loop, the caller's setting back afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------
# Decoding a sample


def decoding(scorer: Any, fast_decode: bool, load_image: Callable | None) -> tuple[Callable, Callable]:
    """(transform, loader) of a run's workers. With `--fast-decode`: the transform's `fast_variant()` where the
    family has one (a faster resize, other pixels) and the DCT-scaled JPEG loader, unless a loader was given."""
    from iqa_cli.images import load_image as default_load

    if not fast_decode:
        return scorer.transform, load_image or default_load
    fast = getattr(scorer.transform, "fast_variant", None)
    return (fast() if fast is not None else scorer.transform), load_image or fast_loader(scorer)


def fast_loader(scorer: Any) -> Callable:
    """`load_image` with JPEG DCT-domain downscaling to the smallest scale the model's preprocessing still only
    shrinks (`--fast-decode`); picklable for the workers."""
    from iqa_cli.images import load_image

    draft = getattr(getattr(scorer, "preprocessor", None), "draft_size", None)
    if draft is None:
        raise UserError("--fast-decode: this model's image preprocessing does not say which decode size it needs")
    return functools.partial(load_image, draft=draft)


@dataclass(frozen=True)
class Decoder:
    """Sample -> (visual inputs or None, width, height, error or None); a failure is an error string, never raised.

    Width and height are the image's as stored, upright (a JPEG decoded at a smaller DCT scale reports its full
    size), for every source alike.
    """

    transform: Callable[[Any], dict[str, torch.Tensor]]
    load: Callable

    def __call__(self, sample: Sample) -> tuple[dict[str, torch.Tensor] | None, int, int, str | None]:
        from iqa_cli.images import describe_image

        if sample.error is not None:
            return None, -1, -1, sample.error
        width = height = -1
        try:
            image = self.load(sample.path if sample.path is not None else io.BytesIO(sample.data))
            width, height = describe_image(image)
            return self.transform(image), width, height, None
        except Exception as exc:  # any decoder failure is a row with `error`, not a crashed run
            return None, width, height, reason(exc)


def reason(exc: BaseException) -> str:
    """An error row's text: the decoder's reason without the path (the row names the image)."""
    from iqa_cli.images import ImageDecodeError

    if isinstance(exc, ImageDecodeError):
        return " ".join(str(exc.reason or exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return " ".join(f"{type(exc).__name__}: {exc}".split())


# ---------------------------------------------------------------------------------------------------
# Batches of one shape


@dataclass(frozen=True)
class PadCollate:
    """One batch of `batch_size` rows whatever its length or failures: the backbone's collate builds the visual
    inputs (padding rows as it defines them); padded rows have unit -1. A batch without items (it only says that
    units ended, empty ones) has no visual inputs (None).

    Fixed shapes keep CUDA kernels and allocator blocks reusable, and an image's score independent of its
    batch-mates. Visual inputs are cast to the model's dtype here, in the worker, when it is a 16-bit one: half
    the bytes to pin and copy, and the same rounding the model's own cast would do. The backbone's collate
    allocates with `iqa_cli.batch_buffer.batch_buffer`, so a worker builds the batch in shared memory and
    handing it over copies nothing; with a `pool`, in blocks the worker reuses once the main process has
    released the batch (`BatchPool.release`).
    """

    batch_size: int
    visual_collate: Callable[..., dict[str, torch.Tensor]]  # the backbone's VisualCollate
    dtype: torch.dtype = torch.float32
    pool: BatchPool | None = None

    def __call__(self, items: list[tuple], done: list[tuple[int, str | None]]) -> dict[str, Any]:
        """`items`: (unit, row in unit, sample, (visual, width, height, error)); `done`: (unit, error) of the units
        whose last row is in this batch or an earlier one."""
        b = self.batch_size
        unit = torch.full((b,), -1, dtype=torch.int64)
        row = torch.full((b,), -1, dtype=torch.int64)
        width = torch.full((b,), -1, dtype=torch.int32)
        height = torch.full((b,), -1, dtype=torch.int32)
        errors: list[str | None] = [None] * b
        for i, (u, r, _, (_, w, h, error)) in enumerate(items):
            unit[i], row[i], width[i], height[i], errors[i] = u, r, w, h, error
        pool = self.pool if items else None  # a batch that only ends units (empty ones) has no visual inputs
        with pool.filling() if pool is not None else contextlib.nullcontext() as filling:
            visual = self.visual_collate([item[3][0] for item in items], b, self.dtype) if items else None
        batch = {
            "visual": visual,
            "unit": unit,
            "row": row,
            "width": width,
            "height": height,
            "error": errors,
            "name": [item[2].name for item in items],
            "kept": [item[2].kept for item in items],
            "done": done,
        }
        if filling is not None:
            batch[BatchPool.STAMP] = filling.stamp()
        return batch


class UnitStream(torch.utils.data.IterableDataset):
    """Streams units (each from its start row) and yields whole batches; every unit, even an empty one or one
    that breaks off, ends up in some batch's `done`."""

    def __init__(self, source: Source, units: np.ndarray, starts: np.ndarray, decode: Decoder, collate: PadCollate):
        self.source, self.units, self.starts = source, units, starts
        self.decode, self.collate = decode, collate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        share = slice(None) if info is None else slice(info.id, None, info.num_workers)
        items: list[tuple] = []
        done: list[tuple[int, str | None]] = []
        full: dict[str, Any] | None = None  # a whole batch held until the next sample shows whether a unit ended
        for u, start in zip(self.units[share].tolist(), self.starts[share].tolist(), strict=True):
            error = None
            try:
                for k, sample in enumerate(self.source.samples(u, start)):
                    if full is not None:
                        yield full
                        full = None
                    items.append((u, start + k, sample, self.decode(sample)))
                    if len(items) == self.collate.batch_size:
                        full, items, done = self.collate(items, done), [], []
            except SourceError as exc:
                error = str(exc)
            except Exception as exc:  # a file that vanished or broke after listing: its unit's error
                error = reason(exc)
            (full["done"] if full is not None else done).append((u, error))
        if full is not None:
            yield full
        if items or done:
            yield self.collate(items, done)


def batch_pool(workers: int, prefetch_factor: int = PREFETCH) -> BatchPool | None:
    """The workers' reusable batch blocks; None when the main process loads (nothing is shared)."""
    return BatchPool(workers, depth=prefetch_factor + 1) if workers else None


def transfer_dtype(scorer: Any) -> torch.dtype:
    dtype = getattr(scorer, "dtype", torch.float32)
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def worker_init(_: int) -> None:
    """Each worker decodes one image at a time (threads would oversubscribe the cores) and leaves SIGINT, SIGTERM
    and SIGHUP to the main process: a stop sent to the whole process group (Ctrl-C, `kill` of a job, a scheduler)
    must not kill a worker before the main process has saved the finished rows."""
    torch.set_num_threads(1)
    interrupts.leave_to_main_process()


def data_loader(dataset: UnitStream, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=PREFETCH if workers else None,
    )


def device_batches(loader: Iterator[dict], device: torch.device) -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
    """Yields (batch, visual inputs on device); on CUDA the next batch is copied on a side stream meanwhile. A copy
    that runs out of GPU memory is not fatal: that batch comes as it is, on the CPU, for the caller to move."""
    if device.type != "cuda":
        for batch in loader:
            yield batch, batch["visual"]
        return
    copy_stream = torch.cuda.Stream(device)

    def send(batch: dict | None) -> dict[str, torch.Tensor] | None:
        if batch is None or batch["visual"] is None:
            return None
        try:
            with torch.cuda.stream(copy_stream):
                return {name: t.to(device, non_blocking=True) for name, t in batch["visual"].items()}
        except torch.OutOfMemoryError:
            return None

    it = iter(loader)
    upcoming = next(it, None)
    upcoming_gpu = send(upcoming)
    while upcoming is not None:
        batch, visual = upcoming, upcoming_gpu
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copy_stream)
        if visual is None:  # no copy made: no visual inputs, or a copy out of memory (moved per chunk)
            visual = batch["visual"]
        else:
            for tensor in visual.values():
                tensor.record_stream(compute)
        upcoming = next(it, None)
        upcoming_gpu = send(upcoming)
        yield batch, visual
