"""Scoring a list of units in this process: loader -> device -> model -> one atomic file per finished unit.

The hot loop of a rank (and of any engine's worker): the driver deals it units, and it hands every row to the
`UnitWriter`, which writes each unit as soon as its last row is scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iqa_cli.errors import UserError
from iqa_cli.process import default_workers
from iqa_cli.progress import NullBar, ProgressBar
from iqa_cli.scoring.config import AUTO_BATCH, interruptible
from iqa_cli.scoring.loader import (
    Decoder,
    PadCollate,
    UnitStream,
    batch_pool,
    data_loader,
    decoding,
    device_batches,
    intra_op_threads,
    model_threads,
    transfer_dtype,
)
from iqa_cli.scoring.runner import BatchRunner, merge_results, settle_size, to_numpy
from iqa_cli.scoring.store import UnitWriter
from iqa_cli.sources import Source


def call_size(
    batch_size: int | None, device: torch.device, source: Source, units: np.ndarray, starts: np.ndarray
) -> int:
    """Rows of every model call: the batch size (`auto`: 64 on CUDA, 16 on the CPU), or the run's number of images
    when it is smaller and known (2 images cost a forward pass of 2, not 16)."""
    size = batch_size or AUTO_BATCH["cuda" if device.type == "cuda" else "cpu"]
    known = [source.rows(u) for u in units.tolist()]
    if all(k >= 0 for k in known):
        size = max(1, min(size, sum(known) - int(starts.sum())))
    return size


def score_parts(runner: BatchRunner, scorer: Any, batch: dict, visual: Any):
    """A batch's rows scored: its image rows in the image call (`runner`, fixed shape), its videos in one video
    call; None when no row has anything to score."""
    scorable = (batch["unit"] >= 0) & torch.tensor([e is None for e in batch["error"]])
    image = video = None
    if visual is not None and bool((scorable & (batch["image_index"] >= 0)).any()):
        image = runner(visual)
    if batch.get("video") is not None and bool((scorable & (batch["video_index"] >= 0)).any()):
        device = torch.device(scorer.device)
        part = {name: t.to(device, non_blocking=True) for name, t in batch["video"].items()}
        rows = next(iter(part.values())).shape[0]
        video = to_numpy(scorer.score_video_batch(part), rows)
    if image is None and video is None:
        return None
    return merge_results(batch, image, video)


def score_units(
    scorer: Any,
    source: Source,
    units: np.ndarray,
    starts: np.ndarray,
    writer: UnitWriter,
    *,
    batch_size: int | None,
    workers: int | None,
    fast_decode: bool = False,
    load_image: Callable | None = None,
    sampling: Any = None,
    per_frame: bool = False,
    local_world_size: int = 1,
    progress: ProgressBar | NullBar | None = None,
    sidecar: Path,
) -> int:
    """Scores `units` (unit `units[i]` from its row `starts[i]`) and returns how many rows it wrote.

    Every model call has one shape, so an image's score never depends on its batch-mates (not even in bf16,
    where kernels for other shapes round differently); a video call's shape is set by its videos' frame count
    alone (`PadCollate`). Videos are sampled by `sampling` (`iqa_cli.video.Sampling`), with `per_frame` each
    sampled frame is also a row of its own, scored as an image. A SIGINT/SIGTERM, an error or the end of the work writes
    the rows of unfinished units as pieces before returning or raising (`iqa_cli.scoring.config.ScoreInterrupted`).

    Raises:
        UserError: out of GPU memory at a fixed --batch-size.
    """
    progress = progress or NullBar()
    device = torch.device(scorer.device)
    auto = batch_size is None and device.type == "cuda"
    loop = build_loop(
        scorer,
        lambda decoder, collate: UnitStream(source, units, starts, decoder, collate),
        size=call_size(batch_size, device, source, units, starts),
        auto=auto,
        workers=min(default_workers(local_world_size) if workers is None else workers, len(units)),
        fast_decode=fast_decode,
        load_image=load_image,
        sampling=sampling,
        per_frame=per_frame,
        local_world_size=local_world_size,
    )
    processed = 0
    try:
        with interruptible(sidecar), torch.inference_mode(), intra_op_threads(loop.threads):
            for batch, visual in device_batches(loop.batches, device):
                processed += loop.step(writer, batch, visual)
                progress.advance(int(((batch["unit"] >= 0) & batch["last"]).sum()))  # samples, as the total counts
        if auto:
            progress.print(f"--batch-size auto: scored in calls of {loop.runner.size} images")
    except torch.OutOfMemoryError:
        raise UserError(out_of_memory(loop.runner.size)) from None
    finally:
        with interruptible(sidecar, defer=True):  # a second Ctrl-C must not cut the last piece short
            writer.flush()
        loop.close()  # stops the workers now rather than when the traceback is dropped
    return processed


def out_of_memory(size: int) -> str:
    return (
        f"out of GPU memory at --batch-size {size}; use a smaller size or --batch-size auto"
        " (for videos: fewer frames, --max-frames or --frames)"
    )


@dataclass
class Loop:
    """One process's scoring loop, built alike for the local engine and a Ray actor: the DataLoader's batches (its
    workers forked), the model calls, the batch blocks to release, and the intra-op threads the model gets."""

    scorer: Any
    batches: Iterator[dict]
    runner: BatchRunner
    pool: Any
    threads: int | None
    workers: int

    def step(self, writer: UnitWriter, batch: dict, visual: Any) -> int:
        """Scores one batch into the writer, releases its block; returns its rows."""
        n = writer.add(batch, score_parts(self.runner, self.scorer, batch, visual))
        if self.pool is not None:
            self.pool.release(batch)
        return n

    def close(self) -> None:
        self.batches = None  # the DataLoader's iterator: its workers stop


def build_loop(
    scorer: Any,
    make_stream: Callable[[Decoder, PadCollate], torch.utils.data.IterableDataset],
    *,
    size: int,
    auto: bool,
    workers: int,
    fast_decode: bool,
    load_image: Callable | None,
    sampling: Any,
    per_frame: bool,
    local_world_size: int,
    in_order: bool = True,
) -> Loop:
    """The loop's parts: `--batch-size auto` settled, the family's transforms and collates, the stream of units
    (`make_stream`: the local engine's fixed share, a Ray actor's queue), the DataLoader started."""
    device = torch.device(scorer.device)
    if auto:
        with torch.inference_mode():
            size = settle_size(scorer, size, transfer_dtype(scorer))
    pool = batch_pool(workers)
    transform, load = decoding(scorer, fast_decode, load_image)
    collate = PadCollate(size, scorer.collate, transfer_dtype(scorer), pool, getattr(scorer, "video_collate", None))
    decoder = Decoder(transform, load, getattr(scorer, "video_transform", None), sampling, per_frame)
    loader = data_loader(make_stream(decoder, collate), workers, device, in_order=in_order)
    batches = iter(loader)  # forks the workers before any thread (progress, pinning) or handler exists
    threads = model_threads(device, workers, local_world_size, torch.get_num_threads())
    return Loop(scorer, batches, BatchRunner(scorer, size, auto=auto), pool, threads, workers)
