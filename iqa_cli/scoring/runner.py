"""The model side of the loop: `score_batch` over a collated batch, in calls of one shape, with the OOM back-off of
`--batch-size auto`."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class BatchResult:
    """numpy results for B rows: probs [B, K] float32, score/std [B], score_reg [B] or None; a reasoning model's
    score_soft [B], errors and generated texts (`iqa_cli.scoring.reasoning`), else None."""

    probs: np.ndarray
    score: np.ndarray
    std: np.ndarray
    score_reg: np.ndarray | None
    score_soft: np.ndarray | None = None
    errors: list[str | None] | None = None
    texts: list[str] | None = None


class BatchRunner:
    """Calls `score_batch` in chunks of `size` rows, each padded to `size`; with `auto`, halves `size` on a CUDA
    out-of-memory error (in the call, or while moving or padding its rows) and retries.

    The size is settled before the run with blank rows (`settle_size`), so this back-off is for calls that need
    more memory than the blank ones did (the transformers families pad each call to its longest image). After
    a halving every later call has the new shape: an image's score never depends on its batch-mates within one
    shape; across the two shapes, bf16 kernels on a GPU may round the last digits differently. The run says the
    size it settled on: pass it as `--batch-size` for reruns that give identical scores.

    Every visual input of a batch has its rows first (the backbone's collate guarantees it); tensors may still
    be on the CPU (a prefetch copy that ran out of memory) and are moved per chunk.
    """

    def __init__(self, scorer: Any, size: int, *, auto: bool):
        self.scorer = scorer
        self.size = size
        self.auto = auto

    def __call__(self, visual: dict[str, torch.Tensor]) -> BatchResult:
        parts: list[BatchResult] = []
        device = torch.device(self.scorer.device)
        start, total = 0, next(iter(visual.values())).shape[0]
        while start < total:
            n = min(self.size, total - start)
            try:
                chunk = {name: rows_padded(t[start : start + n].to(device), self.size) for name, t in visual.items()}
                result = self.scorer.score_batch(chunk)
            except torch.OutOfMemoryError:
                if not self.auto or self.size == 1:
                    raise
                result = None
            if result is None:  # outside `except`, so the failed call's activations are already freed
                chunk = None
                self.size //= 2
                free_cuda_memory()
                continue
            parts.append(to_numpy(result, n))
            start += n
        reasoning = parts[0].texts is not None
        return BatchResult(
            probs=np.concatenate([p.probs for p in parts]),
            score=np.concatenate([p.score for p in parts]),
            std=np.concatenate([p.std for p in parts]),
            score_reg=None if parts[0].score_reg is None else np.concatenate([p.score_reg for p in parts]),
            score_soft=np.concatenate([p.score_soft for p in parts]) if reasoning else None,
            errors=[e for p in parts for e in p.errors] if reasoning else None,
            texts=[t for p in parts for t in p.texts] if reasoning else None,
        )


def settle_size(scorer: Any, size: int, dtype: torch.dtype) -> int:
    """`--batch-size auto` on a GPU: the largest call size from `size` down (halving) that fits, tried with blank
    rows before the first real batch, so that every call of the run has the one shape it settles on (a halving
    in the middle of a run would score its later images in calls of another shape)."""
    device = torch.device(scorer.device)
    while True:
        try:
            visual = scorer.collate([], size, dtype)
            scorer.score_batch({name: t.to(device) for name, t in visual.items()})
            return size
        except torch.OutOfMemoryError:
            if size == 1:
                raise
        visual = None
        size //= 2
        free_cuda_memory()


def rows_padded(rows: torch.Tensor, size: int) -> torch.Tensor:
    """`rows` with zero rows appended up to `size`: one shape per call when the size does not divide the batch."""
    if rows.shape[0] == size:
        return rows
    return torch.cat([rows, rows.new_zeros(size - rows.shape[0], *rows.shape[1:])])


def free_cuda_memory() -> None:
    """Hands the blocks a failed call held back to the GPU (the next call may need them whole); `iqa serve` too."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def to_numpy(result: Any, n: int) -> BatchResult:
    reg = getattr(result, "score_reg", None)
    texts = getattr(result, "texts", None)
    return BatchResult(
        probs=result.probs[:n].float().cpu().numpy(),
        score=result.score[:n].float().cpu().numpy(),
        std=result.std[:n].float().cpu().numpy(),
        score_reg=None if reg is None else reg[:n].float().cpu().numpy(),
        score_soft=None if texts is None else result.score_soft[:n].float().cpu().numpy(),
        errors=None if texts is None else list(result.errors[:n]),
        texts=None if texts is None else list(texts[:n]),
    )


def merge_results(batch: dict, image: BatchResult | None, video: BatchResult | None) -> BatchResult:
    """One result row per batch row from the image call's rows (`batch["image_index"]`) and the video call's
    (`batch["video_index"]`); rows in neither are zeros (failed rows, ignored by the writer)."""
    calls = ((image, "image_index"), (video, "video_index"))
    parts = [(part, batch[key].numpy()) for part, key in calls if part is not None]
    b, k = len(batch["unit"]), parts[0][0].probs.shape[1]
    has_reg = parts[0][0].score_reg is not None
    reasoning = any(part.texts is not None for part, _ in parts)  # a reasoning model's answers (images only)
    merged = BatchResult(
        probs=np.zeros((b, k), np.float32),
        score=np.zeros(b, np.float32),
        std=np.zeros(b, np.float32),
        score_reg=np.zeros(b, np.float32) if has_reg else None,
        score_soft=np.full(b, np.nan, np.float32) if reasoning else None,
        errors=[None] * b if reasoning else None,
        texts=[None] * b if reasoning else None,
    )
    for part, index in parts:
        rows = np.flatnonzero(index >= 0)
        at = index[rows]
        merged.probs[rows], merged.score[rows], merged.std[rows] = part.probs[at], part.score[at], part.std[at]
        if has_reg and part.score_reg is not None:
            merged.score_reg[rows] = part.score_reg[at]
        if part.texts is not None:
            merged.score_soft[rows] = part.score_soft[at]
            for row, i in zip(rows.tolist(), at.tolist(), strict=True):
                merged.errors[row], merged.texts[row] = part.errors[i], part.texts[i]
    return merged
