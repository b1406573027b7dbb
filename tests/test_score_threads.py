"""Threads of the scoring process: the CPU model gets the cores the decode workers leave, OpenMP threads sleep
when idle, neither overrides what the user set, and the thread count moves scores less than float32 rounding."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
from iqa_cli.scoring import loader
from iqa_cli.scoring.config import ScoreConfig
from iqa_cli.scoring.driver import score_images
from iqa_cli.scoring.loader import model_threads
from iqa_cli.scoring.scorer import Scorer
from tests.conftest import REPO_ROOT
from tests.factories import tiny_model, write_checkpoint
from tests.test_score_pipeline import FakeScorer, make_image_folder


def test_the_cpu_model_gets_the_cores_the_workers_leave(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(loader, "cores", lambda: 16)
    cpu = torch.device("cpu")
    assert model_threads(cpu, 8, 1, 16) == 8
    assert model_threads(cpu, 0, 1, 16) == 16
    assert model_threads(cpu, 0, 1, 8) == 8  # never more than torch's own count (physical cores)
    assert model_threads(cpu, 20, 1, 16) == 1
    assert model_threads(cpu, 4, 2, 16) == 4  # two ranks on the machine: 8 cores each
    assert model_threads(torch.device("cuda", 0), 8, 1, 16) is None  # a GPU model: torch's setting stays
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert model_threads(cpu, 8, 1, 16) is None  # the user's choice stays


def test_the_loop_runs_on_those_threads_and_gives_the_callers_setting_back(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(loader, "cores", lambda: 3)
    seen = []

    class CountingScorer(FakeScorer):
        def score_pixels(self, pixel_values):
            seen.append(torch.get_num_threads())
            return super().score_pixels(pixel_values)

    make_image_folder(tmp_path / "photos")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        config = ScoreConfig(out=tmp_path / "s.parquet", inputs=[str(tmp_path / "photos")], batch_size=4, workers=2)
        score_images(config, scorer_factory=lambda device: CountingScorer(device))
        assert seen and set(seen) == {1}  # 3 cores - 2 workers
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_thread_count_moves_scores_less_than_float32_rounding_does(tmp_path):
    """Why not bit-identical across thread counts: iqa's own code splits no reduction by threads, but torch's CPU
    kernels do. The first value that differs is the abstractor's attention: the flash kernel's per-block products
    are MKL sgemm calls into per-thread scratch buffers, and MKL rounds by their alignment (head size 8, 11 keys:
    this model); MKL's split of a matmul over threads changes its rounding too (the 7B model's shapes: 1, 2 and 4
    threads agree, 3 differ in a vision MLP product). MKL's reproducibility modes (MKL_CBWR, strict) do not remove
    the second on the CPUs we ran; only single-thread math would. So this asserts what holds: the same thread count
    gives the same bits (what resuming relies on), and other counts move scores and probabilities by less than
    float32 itself errs from a float64 run of the same model (measured 4.8e-7 vs 2.6e-6; BENCHMARKS.md, issue 13)."""
    overrides = {"vision": {"image_size": 448, "patch_size": 224}, "abstractor": {"grid_size": 2}}  # the bench's
    model = tiny_model(seed=5, **overrides)
    ckpt = write_checkpoint(model, tmp_path / "m", tokenizer_dir=build_tiny_tokenizer(tmp_path / "tok"))
    scorer = Scorer.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.normal(0, 1, (16, 3, 448, 448)).astype(np.float32))
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3, 4, 2):
            torch.set_num_threads(threads)
            result = scorer.score_pixels(pixels)
            if threads in results:
                assert torch.equal(result.score, results[threads].score)
                assert torch.equal(result.probs, results[threads].probs)
            results[threads] = result
        scorer.model.double()  # the same weights in float64: the exact scores, up to float64 rounding
        exact = scorer.score_pixels(pixels.double())
    finally:
        torch.set_num_threads(before)
    float32_error = {key: (getattr(results[1], key).double() - getattr(exact, key).double()).abs().max().item()
                     for key in ("score", "probs")}  # fmt: skip
    assert 0 < float32_error["score"] < 1e-5 and float32_error["probs"] < 1e-5
    for threads, result in results.items():
        for key in ("score", "probs"):
            moved = (getattr(result, key) - getattr(results[1], key)).abs().max().item()
            assert moved <= float32_error[key], (threads, key, moved, float32_error[key])


@pytest.mark.parametrize("user", [None, "ACTIVE"])
def test_openmp_threads_sleep_when_idle_unless_the_user_said_otherwise(user):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user:
        env["OMP_WAIT_POLICY"] = user
    code = (
        "import os, sys; from iqa_cli.cli import main; sys.argv = ['iqa', '--version']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"{user or 'PASSIVE'} False"  # set before torch is imported
