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
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

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


class Decoded(NamedTuple):
    """One output row's model inputs: `visual` (None: nothing to score, `error` says why), the input's width and
    height as stored (-1 unknown); for a video row its sampled frame count, duration and frame rate; for a
    `--per-frame` row the frame's index in its video."""

    visual: dict[str, torch.Tensor] | None
    width: int = -1
    height: int = -1
    error: str | None = None
    video: bool = False  # the video's own row: `visual` is the family's video inputs
    frames: int = -1
    duration: float = math.nan
    fps: float = math.nan
    frame: int = -1
    ends_sample: bool = True  # the sample's last row (a video's frame rows follow its own)

    @property
    def video_input(self) -> bool:
        """Scored in the batch's video call (a decoded video), not the image call."""
        return self.video and self.visual is not None


@dataclass(frozen=True)
class Decoder:
    """Sample -> its rows (`Decoded`): an image is one row; a video is one row of its sampled frames
    (`iqa_cli.video`), followed with `per_frame` by one image row per frame. A failure is an error row, never
    raised.

    Width and height are the image's as stored, upright (a JPEG decoded at a smaller DCT scale reports its full
    size), or the video's frames', for every source alike.
    """

    transform: Callable[[Any], dict[str, torch.Tensor]]
    load: Callable
    video_transform: Callable[[Any], dict[str, torch.Tensor]] | None = None  # a Video -> the family's video inputs
    sampling: Any = None  # iqa_cli.video.Sampling (None: its default, one frame per second)
    per_frame: bool = False

    def __call__(self, sample: Sample) -> Decoded:
        """The sample's own row (an image's, or a video's without its frame rows)."""
        return self.rows(sample)[0]

    def rows(self, sample: Sample) -> list[Decoded]:
        if sample.error is not None:
            return [Decoded(None, error=sample.error, video=sample.video)]
        if sample.video:
            return self._video(sample)
        from iqa_cli.images import describe_image

        width = height = -1
        try:
            image = self.load(sample.path if sample.path is not None else io.BytesIO(sample.data))
            width, height = describe_image(image)
            return [Decoded(self.transform(image), width, height)]
        except Exception as exc:  # any decoder failure is a row with `error`, not a crashed run
            return [Decoded(None, width, height, reason(exc))]

    def _video(self, sample: Sample) -> list[Decoded]:
        from iqa_cli.video import Sampling, load_video

        if self.video_transform is None:
            return [Decoded(None, error="this model family does not score videos", video=True)]
        try:
            video = load_video(sample.path if sample.path is not None else sample.data, self.sampling or Sampling())
            visual = self.video_transform(video)
        except Exception as exc:
            return [Decoded(None, error=reason(exc), video=True)]
        described = {"duration": video.duration, "fps": video.fps}
        own = Decoded(visual, video.width, video.height, video=True, frames=len(video.frames), **described)
        if not self.per_frame:
            return [own]
        rows = [own._replace(ends_sample=False)]
        for i, (index, frame) in enumerate(zip(video.indices, video.frames, strict=True)):
            last = i == len(video.frames) - 1
            try:
                visual, error = self.transform(frame), None
            except Exception as exc:  # this frame's row fails; the video's own row and its other frames stand
                visual, error = None, reason(exc)
            rows.append(Decoded(visual, *frame.size, error, frame=index, ends_sample=last, **described))
        return rows


def decoded(value: Any) -> Decoded:
    """A `Decoded` from what a decoder gave: a Decoded, or an image's (visual, width, height, error)."""
    return value if isinstance(value, Decoded) else Decoded(*value)


def reason(exc: BaseException) -> str:
    """An error row's text: the decoder's reason without the path (the row names the image)."""
    from iqa_cli.errors import DecodeError

    if isinstance(exc, DecodeError):
        return " ".join(str(exc.reason or exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return " ".join(f"{type(exc).__name__}: {exc}".split())


# ---------------------------------------------------------------------------------------------------
# Batches of one shape


def videos_per_call(size: int, frames: int) -> int:
    """Videos of `frames` frames in a call of `size` image rows: as many frames as the call has images (at least
    one video), so a video call needs about the memory of an image call; its shape depends on the frame count
    alone (`iqa score`'s loop and `iqa serve`'s batcher both cut video calls so)."""
    return max(1, size // max(1, frames))


@dataclass(frozen=True)
class PadCollate:
    """One batch of at most `batch_size` rows whatever its length or failures, in at most two model calls of fixed
    shapes: its image rows (failed rows among them, as padding) through the backbone's collate into
    `batch_size` rows, and its video rows through the video collate into `video_rows(F)` rows of F frames (every
    video of a batch has the same frame count F). Padded rows have unit -1. A batch without items (it only says
    that units ended, empty ones) has no visual inputs (None).

    Fixed shapes keep CUDA kernels and allocator blocks reusable, and an image's score independent of its
    batch-mates; a video call's shape depends only on its videos' frame count, so a video's score depends on
    nothing but the video. Visual inputs are cast to the model's dtype here, in the worker, when it is a 16-bit
    one: half the bytes to pin and copy, and the same rounding the model's own cast would do. The backbone's
    collate allocates with `iqa_cli.batch_buffer.batch_buffer`, so a worker builds the batch in shared memory and
    handing it over copies nothing; with a `pool`, in blocks the worker reuses once the main process has
    released the batch (`BatchPool.release`).
    """

    batch_size: int
    visual_collate: Callable[..., dict[str, torch.Tensor]]  # the backbone's VisualCollate
    dtype: torch.dtype = torch.float32
    pool: BatchPool | None = None
    video_collate: Callable[..., dict[str, torch.Tensor]] | None = None  # the backbone's, for video rows

    def video_rows(self, frames: int) -> int:
        return videos_per_call(self.batch_size, frames)

    def starts_new_batch(self, items: list[tuple], row: Decoded) -> bool:
        """Whether `row` cannot join `items`: a video whose frame count differs from theirs."""
        if not row.video_input:
            return False
        return any(d.video_input and d.frames != row.frames for d in (decoded(item[3]) for item in items))

    def full(self, items: list[tuple]) -> bool:
        if len(items) >= self.batch_size:
            return True
        videos = [d for d in (decoded(item[3]) for item in items) if d.video_input]
        return bool(videos) and len(videos) >= self.video_rows(videos[0].frames)

    def __call__(self, items: list[tuple], done: list[tuple[int, str | None]]) -> dict[str, Any]:
        """`items`: (unit, row in unit, sample, Decoded or an image's (visual, width, height, error)); `done`: (unit,
        error) of the units whose last row is in this batch or an earlier one."""
        b = self.batch_size
        rows = [decoded(item[3]) for item in items]
        columns = {
            "unit": torch.full((b,), -1, dtype=torch.int64),
            "row": torch.full((b,), -1, dtype=torch.int64),
            "width": torch.full((b,), -1, dtype=torch.int32),
            "height": torch.full((b,), -1, dtype=torch.int32),
            "frames": torch.full((b,), -1, dtype=torch.int32),
            "duration": torch.full((b,), math.nan, dtype=torch.float32),
            "fps": torch.full((b,), math.nan, dtype=torch.float32),
            "frame": torch.full((b,), -1, dtype=torch.int32),
            "last": torch.ones((b,), dtype=torch.bool),
            "image_index": torch.full((b,), -1, dtype=torch.int64),
            "video_index": torch.full((b,), -1, dtype=torch.int64),
        }
        errors: list[str | None] = [None] * b
        images, videos = [], []
        for i, ((u, r, *_), row) in enumerate(zip(items, rows, strict=True)):
            values = {"unit": u, "row": r, "width": row.width, "height": row.height, "frames": row.frames,
                      "duration": row.duration, "fps": row.fps, "frame": row.frame,
                      "last": row.ends_sample}  # fmt: skip
            for name, value in values.items():
                columns[name][i] = value
            errors[i] = row.error
            part = videos if row.video_input else images
            columns["video_index" if row.video_input else "image_index"][i] = len(part)
            part.append(row.visual)
        pool = self.pool if items else None  # a batch that only ends units (empty ones) has no visual inputs
        with pool.filling() if pool is not None else contextlib.nullcontext() as filling:
            visual = self.visual_collate(images, b, self.dtype) if images else None
            video = None
            if videos:
                if self.video_collate is None:
                    raise ValueError("video rows need the backbone's video collate")
                video = self.video_collate(videos, self.video_rows(_frames(rows)), self.dtype)
        batch = {
            "visual": visual,
            "video": video,
            **columns,
            "error": errors,
            "name": [item[2].name for item in items],
            "kept": [item[2].kept for item in items],
            "done": done,
        }
        if filling is not None:
            batch[BatchPool.STAMP] = filling.stamp()
        return batch


def _frames(rows: list[Decoded]) -> int:
    """The frame count of a batch's videos (one for all of them)."""
    return next(row.frames for row in rows if row.video_input)


class UnitStream(torch.utils.data.IterableDataset):
    """Streams units (each from its start row) and yields whole batches; every unit, even an empty one or one
    that breaks off, ends up in some batch's `done`.

    Each worker streams the units `assigned` gives it: its strided share here; a subclass may hand them out as
    they come (`iqa_cli.engines.ray_worker`), yielding None while the next one is not there yet, so that the rows
    held in an unfinished batch go out (padded) and the units in it can finish.
    """

    def __init__(self, source: Source, units: np.ndarray, starts: np.ndarray, decode: Any, collate: PadCollate):
        self.source, self.units, self.starts = source, units, starts
        self.decode, self.collate = decode, collate

    def _rows(self, sample: Sample) -> list[Any]:
        rows = getattr(self.decode, "rows", None)
        return rows(sample) if rows is not None else [self.decode(sample)]

    def assigned(self) -> Iterator[tuple[int, int] | None]:
        """(unit, start row) of each unit this worker streams, in order."""
        info = torch.utils.data.get_worker_info()
        share = slice(None) if info is None else slice(info.id, None, info.num_workers)
        return zip(self.units[share].tolist(), self.starts[share].tolist(), strict=True)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items: list[tuple] = []
        done: list[tuple[int, str | None]] = []
        full: dict[str, Any] | None = None  # a whole batch held until the next row shows whether a unit ended
        for unit in self.assigned():
            if unit is None:  # idle: what is held goes out now
                if full is not None:
                    yield full
                    full = None
                if items or done:
                    yield self.collate(items, done)
                    items, done = [], []
                continue
            u, start = unit
            error = None
            try:
                for k, sample in enumerate(self.source.samples(u, start)):
                    for row in self._rows(sample):
                        if full is not None:
                            yield full
                            full = None
                        if items and self.collate.starts_new_batch(items, decoded(row)):
                            yield self.collate(items, done)
                            items, done = [], []
                        items.append((u, start + k, sample, row))
                        if self.collate.full(items):
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


def data_loader(
    dataset: UnitStream, workers: int, device: torch.device, *, in_order: bool = True
) -> torch.utils.data.DataLoader:
    """`in_order=False` takes each worker's batches as they come (each worker's still in its order): for workers
    fed units as they come, one waiting for a unit must not hold up the batches of the others."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=PREFETCH if workers else None,
        in_order=in_order,
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
