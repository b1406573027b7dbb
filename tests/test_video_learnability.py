"""A tiny random-init mPLUG-Owl2 and a tiny Qwen2-VL learn video quality through the real CLI: 720 generated
64x48 clips of 4 frames (`tests.videos.write_graded_clips`: a drifting scene blurred and noised at eight strengths,
the MOS falling with the strength) -> `iqa prepare custom` -> `iqa train --frames 2` (DeQA-Score) -> `iqa score
--frames 2` on the 144 held-out clips; the SRCC is computed with scipy from the written files.

The models see the frames the way they score them: mPLUG-Owl2 (112 px) both frames' tokens in its one image
slot, Qwen2-VL (56 x 56 frames, --min/--max-pixels) its processor's video input, the two frames one temporal
patch. Cost (one OpenMP thread, an idle 2-core machine): about 40 s of training for mPLUG-Owl2 (4 epochs) and
55 s for Qwen2-VL (6 epochs); measured SRCC 0.90 and 0.89.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ONE_THREAD, last_train_record, run_iqa
from tests.videos import write_graded_clips

pytest.importorskip("av")
N_CLIPS = 720  # 576 train, 144 held out
COMMON = ("--batch-size", "8", "--lr", "1e-3", "--layout", "scoring", "--no-gradient-checkpointing", "--workers", "1",
          "--no-eval", "-q", "--frames", "2")  # fmt: skip
QWEN_PIXELS = ("--min-pixels", str(56 * 56), "--max-pixels", str(56 * 56))
TIMEOUT = 900  # s per command: about 10x an idle 2-core machine's time, for loaded CI machines


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("video_learnability")
    scores = write_graded_clips(tmp / "src", N_CLIPS, size=(64, 48))
    data = tmp / "data"
    proc = run_iqa("prepare", "custom", "--csv", str(scores), "--images", str(scores.parent / "videos"),
                   "--image-col", "video", "--mos-col", "mos", "--std-col", "std", "--name", "clips",
                   "--data-dir", str(data), "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    meta = pd.read_parquet(data / "clips.parquet")
    test = tmp / "test.csv"
    meta.loc[meta["split"] == "test", ["image"]].to_csv(test, index=False)
    return {"tmp": tmp, "data": data, "videos": scores.parent / "videos", "test": test}


def _learns(clips: dict[str, Path], model: Path, name: str, epochs: int, extra: tuple[str, ...] = ()) -> float:
    from scipy.stats import spearmanr

    run = clips["tmp"] / f"run-{name}"
    data = ("--datasets", "clips", "--data-dir", str(clips["data"]), "--model", str(model))
    proc = run_iqa("train", *data, "--out", str(run), "--method", "deqa", "--epochs", str(epochs), *COMMON, *extra,
                   env=ONE_THREAD, timeout=TIMEOUT, progress=lambda: last_train_record(run))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = json.loads((run / "iqa.json").read_text())
    assert info["tasks"] == {"clips": "quality"} and info["train"]["frames"] == 2
    predictions = clips["tmp"] / f"pred-{name}.parquet"
    proc = run_iqa("score", "--from", str(clips["test"]), "--root", str(clips["videos"]), "--model", str(run),
                   "--out", str(predictions), "--frames", "2", "--workers", "0", "--quiet", env=ONE_THREAD,
                   timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    scored = pd.read_parquet(predictions)
    assert scored["error"].isna().all() and (scored["frames"] == 2).all() and len(scored) == N_CLIPS // 5
    meta = pd.read_parquet(clips["data"] / "clips.parquet")
    held_out = meta[meta["split"] == "test"].merge(scored, on="image")
    return spearmanr(held_out["score"], held_out["mos_norm"]).statistic


@pytest.mark.slow
def test_tiny_mplug_owl2_learns_video_quality(clips):
    from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint

    start = time.perf_counter()
    srcc = _learns(clips, write_tiny_checkpoint(clips["tmp"] / "tiny-mplug", image_size=112), "mplug", epochs=4)
    print(f"mPLUG-Owl2: SRCC {srcc:.4f} in {time.perf_counter() - start:.1f} s")
    assert srcc >= 0.8


@pytest.mark.slow
def test_tiny_qwen2_vl_learns_video_quality(clips):
    from iqa_cli.models.hf_vlm.tiny import tiny_checkpoint

    start = time.perf_counter()
    model = tiny_checkpoint("qwen2_vl", clips["tmp"] / "tiny-qwen2-vl")
    srcc = _learns(clips, model, "qwen", epochs=6, extra=QWEN_PIXELS)
    print(f"Qwen2-VL: SRCC {srcc:.4f} in {time.perf_counter() - start:.1f} s")
    assert srcc >= 0.8
