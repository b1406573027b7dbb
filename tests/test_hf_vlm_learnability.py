"""A tiny random-init Qwen2-VL learns image quality through the real CLI: synthetic blur/JPEG/noise data
(`iqa prepare custom`) -> `iqa train` -> `iqa score` -> `iqa eval --json`, for DeQA-Score and Q-Scorer.

The images are 56 x 56, the Qwen2-VL image processor's size at --min/--max-pixels 56*56: 4 x 4 patches of 14 px,
merged 2 x 2 into 4 visual tokens, so a run of ~1000 steps takes about a minute on one core. The SRCC on the
held-out split is recomputed with scipy from the written predictions and meta.
"""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ONE_THREAD, last_train_record, run_iqa
from tests.test_train_data import prepare_synthetic

N_IMAGES = 1200  # 960 train, 240 held out
SIDE = 56
PIXELS = ("--min-pixels", str(SIDE * SIDE), "--max-pixels", str(SIDE * SIDE))
COMMON = ("--epochs", "8", "--batch-size", "8", "--lr", "1e-3", "--layout", "scoring", "--no-gradient-checkpointing",
          "--workers", "1", "--no-eval", "-q", *PIXELS)  # fmt: skip
METHODS = {
    "deqa": (),
    "qscorer": ("--w-kl", "1", "--w-fid", "1", "--mlp-dims", "64,32"),
}
TIMEOUT = 900  # s per command: about 10x an idle 2-core machine's time, for loaded CI machines


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    import pandas as pd

    from iqa_cli.models.hf_vlm.tiny import tiny_checkpoint

    tmp = tmp_path_factory.mktemp("hf_vlm_learnability")
    data_dir = prepare_synthetic(tmp, "synth", N_IMAGES, seed=0, size=(SIDE, SIDE))
    meta = pd.read_parquet(data_dir / "synth.parquet")
    test_list = tmp / "test.csv"
    meta.loc[meta["split"] == "test", ["image"]].to_csv(test_list, index=False)
    model = tiny_checkpoint("qwen2_vl", tmp / "tiny-qwen2-vl")
    return {"tmp": tmp, "data": data_dir, "images": tmp / "synth-src" / "images", "test": test_list, "model": model}


def _eval_srcc(synthetic: dict[str, Path], predictions: Path, column: str) -> float:
    """`iqa eval --json`'s held-out SRCC for `column`, checked against scipy's on the written files."""
    import pandas as pd
    from scipy.stats import spearmanr

    meta_path = synthetic["data"] / "synth.parquet"
    report = synthetic["tmp"] / f"{predictions.stem}-{column}.json"
    proc = run_iqa("eval", str(predictions), "--gt", str(meta_path), "--column", column, "--json", str(report))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    assert result["split"] == "test" and result["counts"]["matched"] == N_IMAGES // 5
    (row,) = [r for r in result["results"] if r["dataset"] == "synth"]
    meta = pd.read_parquet(meta_path)
    test = meta[meta["split"] == "test"].merge(pd.read_parquet(predictions), on="image")
    assert len(test) == row["n"] == N_IMAGES // 5
    assert np.isclose(row["srcc"], spearmanr(test[column], test["mos_norm"]).statistic, atol=1e-9)
    return row["srcc"]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_tiny_qwen2_vl_learns_quality_from_random_init(synthetic, method):
    import pandas as pd

    start = time.perf_counter()
    run = synthetic["tmp"] / f"run-{method}"
    data = ("--datasets", "synth", "--data-dir", str(synthetic["data"]), "--model", str(synthetic["model"]))
    proc = run_iqa("train", *data, "--out", str(run), "--method", method, *COMMON, *METHODS[method],
                   env=ONE_THREAD, timeout=TIMEOUT, progress=lambda: last_train_record(run))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = json.loads((run / "iqa.json").read_text())
    assert info["family"] == "qwen2_vl" and info["method"] == method
    predictions = synthetic["tmp"] / f"pred-{method}.parquet"
    proc = run_iqa("score", "--from", str(synthetic["test"]), "--root", str(synthetic["images"]), "--model", str(run),
                   "--out", str(predictions), "--workers", "0", "--quiet", env=ONE_THREAD, timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    scored = pd.read_parquet(predictions)
    assert scored["error"].isna().all() and len(scored) == N_IMAGES // 5
    srcc = _eval_srcc(synthetic, predictions, "score")
    print(f"{method}: SRCC {srcc:.4f} in {time.perf_counter() - start:.1f} s")
    assert srcc >= 0.9
    if method == "qscorer":  # the regressor head's score, trained alongside the level tokens
        srcc_reg = _eval_srcc(synthetic, predictions, "score_reg")
        print(f"{method} regressor: SRCC {srcc_reg:.4f}")
        assert srcc_reg >= 0.9
