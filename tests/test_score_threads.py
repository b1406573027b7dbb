"""Threads of the scoring process: the CPU model gets the cores the decode workers leave, OpenMP threads sleep
when idle, neither overrides what the user set, and the scores do not depend on the thread count."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from iqa_cli import distributed
from iqa_cli.scoring import pipeline
from iqa_cli.scoring.pipeline import ScoreConfig, model_threads, score_images
from iqa_cli.scoring.scorer import Scorer
from iqa_cli.synthetic import build_tiny_tokenizer
from tests.conftest import REPO_ROOT
from tests.factories import tiny_model, write_checkpoint
from tests.test_score_pipeline import FakeScorer, make_image_folder

ALONE = distributed.DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1)


def test_the_cpu_model_gets_the_cores_the_workers_leave(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(pipeline, "_cores", lambda: 16)
    cpu = torch.device("cpu")
    assert model_threads(cpu, 8, ALONE, 16) == 8
    assert model_threads(cpu, 0, ALONE, 16) == 16
    assert model_threads(cpu, 0, ALONE, 8) == 8  # never more than torch's own count (physical cores)
    assert model_threads(cpu, 20, ALONE, 16) == 1
    two_ranks = distributed.DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert model_threads(cpu, 4, two_ranks, 16) == 4
    assert model_threads(torch.device("cuda", 0), 8, ALONE, 16) is None  # a GPU model: torch's setting stays
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert model_threads(cpu, 8, ALONE, 16) is None  # the user's choice stays


def test_the_loop_runs_on_those_threads_and_gives_the_callers_setting_back(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(pipeline, "_cores", lambda: 3)
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


def test_scores_are_the_same_on_one_and_two_threads(tmp_path):
    ckpt = write_checkpoint(tiny_model(seed=5), tmp_path / "m", tokenizer_dir=build_tiny_tokenizer(tmp_path / "tok"))
    scorer = Scorer.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.normal(0, 1, (4, 3, *scorer.preprocessor.crop_size)).astype(np.float32))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(scorer.score_pixels(pixels))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(results[0].probs, results[1].probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(results[0].score, results[1].score, atol=1e-5, rtol=0)


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
