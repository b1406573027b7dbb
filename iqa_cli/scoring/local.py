"""Scoring a list of units in this process: loader -> device -> model -> one atomic file per finished unit.

The hot loop of a rank (and of any engine's worker): the driver deals it units, and it hands every row to the
`UnitWriter`, which writes each unit as soon as its last row is scored.
"""

from __future__ import annotations

from collections.abc import Callable
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
    size = call_size(batch_size, device, source, units, starts)
    auto = batch_size is None and device.type == "cuda"
    if auto:
        with torch.inference_mode():
            size = settle_size(scorer, size, transfer_dtype(scorer))
    workers = default_workers(local_world_size) if workers is None else workers
    workers = min(workers, len(units))
    pool = batch_pool(workers)
    transform, load = decoding(scorer, fast_decode, load_image)
    video_transform = getattr(scorer, "video_transform", None)
    collate = PadCollate(size, scorer.collate, transfer_dtype(scorer), pool, getattr(scorer, "video_collate", None))
    decoder = Decoder(transform, load, video_transform, sampling, per_frame)
    loader = data_loader(UnitStream(source, units, starts, decoder, collate), workers, device)
    runner = BatchRunner(scorer, size, auto=auto)
    batches = iter(loader)  # forks the workers before any thread (progress, pinning) or handler exists
    processed = 0
    try:
        threads = model_threads(device, workers, local_world_size, torch.get_num_threads())
        with interruptible(sidecar), torch.inference_mode(), intra_op_threads(threads):
            for batch, visual in device_batches(batches, device):
                n = writer.add(batch, score_parts(runner, scorer, batch, visual))
                if pool is not None:
                    pool.release(batch)
                processed += n
                progress.advance(int(((batch["unit"] >= 0) & batch["last"]).sum()))  # samples, as the total counts
        if auto:
            progress.print(f"--batch-size auto: scored in calls of {runner.size} images")
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of GPU memory at --batch-size {runner.size}; use a smaller size or --batch-size auto"
            " (for videos: fewer frames, --max-frames or --frames)"
        ) from None
    finally:
        with interruptible(sidecar, defer=True):  # a second Ctrl-C must not cut the last piece short
            writer.flush()
        del batches  # stops the workers now rather than when the traceback is dropped
    return processed
