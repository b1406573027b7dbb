"""`iqa score`'s fixed call shape seen end to end: an image scores the same alone in its call, among others
and in a padded last batch, for several batch sizes and worker counts.

The scorer double's output for a row depends on how many rows its model call has (as a kernel picked per
shape rounds differently in bfloat16), so a call that lost its padding changes a score. The real tiny model on
the CPU hides that; the `gpu` test below runs it in bfloat16 on CUDA, where it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

# The scoring loop's public entry and the allocator its collates must use: the only scoring imports here.
from iqa_cli.batch_buffer import batch_buffer
from iqa_cli.scoring.config import ScoreConfig
from iqa_cli.scoring.driver import score_images

LEVELS = ["bad", "poor", "fair", "good", "excellent"]
CENTERS = torch.linspace(1, 5, 5, dtype=torch.float64)


@dataclass
class Output:
    probs: torch.Tensor
    score: torch.Tensor
    std: torch.Tensor
    score_reg: None = None


def image_mean(image: Image.Image) -> dict[str, torch.Tensor]:
    """The double's transform (module level: DataLoader workers get it pickled)."""
    return {"x": torch.tensor([float(np.asarray(image, dtype=np.float64).mean()) / 255])}


def stack_rows(items: list, batch_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The double's collate: `batch_size` rows in `batch_buffer` memory, rows without an image zero."""
    x = batch_buffer((batch_size, 1), dtype)
    x.zero_()
    for row, item in enumerate(items):
        if item is not None:
            x[row] = item["x"]
    return {"x": x}


class RowCountScorer:
    """The scorer contract; a row's levels come from its image's mean and from the call's row count."""

    level_names = LEVELS
    has_regressor = False
    dtype = torch.float32
    transform = staticmethod(image_mean)
    collate = staticmethod(stack_rows)

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.metadata = {"model": "double", "revision": "0" * 40, "dtype": "float32", "prompt": "<|image|>",
                         "level_names": '["bad", "poor", "fair", "good", "excellent"]'}  # fmt: skip

    def score_batch(self, visual: dict[str, torch.Tensor]) -> Output:
        x = visual["x"][:, 0].double()
        target = 1 + 4 * x + 0.5 / x.shape[0]  # the call's row count shifts every row
        probs = torch.softmax(-((target[:, None] - CENTERS) ** 2), dim=1)
        score = probs @ CENTERS
        std = (probs * (CENTERS - score[:, None]) ** 2).sum(1).sqrt()
        return Output(probs.float(), score.float(), std.float())


def _folder(root: Path, n: int, probe_at: list[int]) -> Path:
    """`n` PNGs named in input order (000.png, 001.png, ...); the probe's pixels at the positions `probe_at`."""
    root.mkdir(parents=True)
    for i in range(n):
        seed, level = (999, 150) if i in probe_at else (i, 60 + 10 * (i % 9))
        pixels = np.random.default_rng(seed).normal(level, 30, (18, 22, 3)).clip(0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"{i:03d}.png")
    return root


def _probe_rows(out: Path, positions: list[int]) -> list[tuple[float, list[float]]]:
    frame = pd.read_parquet(out).set_index("image")
    rows = [frame.loc[f"{i:03d}.png"] for i in positions]
    assert all(pd.isna(row["error"]) for row in rows)
    return [(float(row["score"]), [float(p) for p in row["probs"]]) for row in rows]


def _score(folder: Path, out: Path, factory, **options) -> Path:
    config = ScoreConfig(out=out, inputs=[str(folder)], quiet=True, **options)
    summary = score_images(config, scorer_factory=factory)
    assert summary.failed == 0
    return out


@pytest.mark.parametrize(("batch_size", "workers"), [(3, 0), (4, 2), (5, 1)])
def test_a_probe_scores_the_same_alone_among_others_and_in_a_padded_last_batch(tmp_path, batch_size, workers):
    b = batch_size
    options = {"batch_size": b, "workers": workers, "device": "cpu"}
    # run 1: the probe among others in the first full batch, and alone in the last one (1 image, b - 1 pads)
    first = _folder(tmp_path / "one", 2 * b + 1, probe_at=[1, 2 * b])
    # run 2: the probe beside one other image in a padded last batch
    second = _folder(tmp_path / "two", b + 2, probe_at=[b + 1])
    rows = _probe_rows(_score(first, tmp_path / "one.parquet", RowCountScorer, **options), [1, 2 * b])
    rows += _probe_rows(_score(second, tmp_path / "two.parquet", RowCountScorer, **options), [b + 1])
    among, alone, padded = rows
    assert among == alone == padded  # bit for bit, probabilities too
    # and the double does tell a call of another size: a lost pad would have changed the score
    one_row = RowCountScorer("cpu").score_batch(stack_rows([image_mean(Image.open(second / f"{b + 1:03d}.png"))],
                                                           1, torch.float32))  # fmt: skip
    assert float(one_row.score[0]) != alone[0]


@pytest.mark.gpu
@pytest.mark.parametrize("workers", [0, 2])
def test_on_cuda_in_bfloat16_a_probe_scores_the_same_alone_among_others_and_padded(tmp_path, workers):
    """The real tiny mPLUG-Owl2 in bfloat16 on CUDA, where kernels for other shapes round differently."""
    from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "model", seed=7)
    b = 4
    options = {"batch_size": b, "workers": workers, "device": "cuda", "dtype": "bfloat16", "model": str(model)}
    first = _folder(tmp_path / "one", 2 * b + 1, probe_at=[1, 2 * b])
    second = _folder(tmp_path / "two", b + 2, probe_at=[b + 1])
    rows = _probe_rows(_score(first, tmp_path / "one.parquet", None, **options), [1, 2 * b])
    rows += _probe_rows(_score(second, tmp_path / "two.parquet", None, **options), [b + 1])
    among, alone, padded = rows
    assert among == alone == padded
