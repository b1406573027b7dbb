"""The proof that the losses and the training loop are right: a random-init tiny mPLUG-Owl2 learns IQA.

Synthetic data (`iqa_cli.synthetic`, what `iqa demo` trains on): 1,200 natural-looking 112x96 images (1/f
cloud textures with hard-edged shapes), each blurred, JPEG-compressed and noised at one of eight graded
strengths; the MOS is a known monotone function of the strength, the std comes from a seeded model.
The real CLI prepares it (`iqa prepare custom`, 80/20 seeded split), trains a tiny model from random init
(`iqa_cli.models.mplug_owl2.tiny`: 64-wide 2-layer LLM, 32-wide ViT at 112 px, tiny sentencepiece tokenizer) on CPU,
scores the held-out 240 images with `iqa score --model RUN` (no other model flag) and evaluates with
`iqa eval`.

What each method needs to get past the random model's plateau (about 4-6k images before the image starts
to matter; measured on 2 cores): DeQA-Score's pair fidelity loss is the strongest signal (8 epochs of 8 pairs);
Q-Align's plain CE needs 11 epochs; Q-Scorer keeps its CE + MSE and adds two of the paper's options, the
soft-label KL on the score tokens and the fidelity loss on same-dataset pairs of the batch (without them the
MSE through the fresh MLP keeps the random model on its plateau for 1,000+ steps). Every run trains on the
scoring prompt's layout (`--layout scoring`; with the default image-first layout DeQA-Score reaches about
0.90, too close to the bar) with lr 1e-3 and no gradient checkpointing (its numerics are tested elsewhere).

Margins: a different CPU may take a different (but deterministic) trajectory, much like another `--seed`.
With seeds 1-3 these settings gave SRCC 0.942-0.948 (deqa), 0.939-0.949 (qalign) and 0.927-0.941 (qscorer);
fewer epochs (6 deqa, 8 qalign) went as low as 0.932 and 0.903.

DeQA-Score's run is `tests/test_demo.py`: `iqa demo` trains on the same data with the same settings
(`iqa_cli.demo.TRAIN_ARGS`) and must reach the same bar, so it is not trained a second time here.

Cost: each training command runs with one OpenMP thread (`ONE_THREAD`); with the default two, the
threads spin against the data-loader worker and the other tests on a 2-core machine and a run took 4x as
long (qalign hit the old 600 s timeout on a loaded machine; one thread: 144 s wall with the machine shared).
A run that still overruns fails with the last record of its train_log.jsonl and the end of its stderr.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import ONE_THREAD, last_train_record, run_iqa
from tests.test_train_data import prepare_synthetic, write_tiny_model

N_IMAGES = 1200
COMMON = ("--lr", "1e-3", "--layout", "scoring", "--no-gradient-checkpointing", "--workers", "1", "--no-eval", "-q")
TIMEOUT = 1500  # s per command: about 10x an idle 2-core machine's time, for loaded CI machines
METHODS = {
    "qalign": ("--epochs", "11", "--batch-size", "8"),
    "qscorer": ("--epochs", "8", "--batch-size", "8", "--w-kl", "1", "--w-fid", "1", "--mlp-dims", "512,256"),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    import pandas as pd

    tmp = tmp_path_factory.mktemp("learnability")
    data_dir = prepare_synthetic(tmp, "synth", N_IMAGES, seed=0)
    meta = pd.read_parquet(data_dir / "synth.parquet")
    test_list = tmp / "test.csv"
    meta.loc[meta["split"] == "test", ["image"]].to_csv(test_list, index=False)
    model = write_tiny_model(tmp / "model", image_size=112)
    return {"tmp": tmp, "data": data_dir, "images": tmp / "synth-src" / "images", "test": test_list, "model": model}


def _eval_srcc(synthetic: dict[str, Path], predictions: Path, column: str) -> float:
    report = synthetic["tmp"] / f"{predictions.stem}-{column}.json"
    proc = run_iqa("eval", str(predictions), "--gt", str(synthetic["data"] / "synth.parquet"), "--column", column,
                   "--json", str(report))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    assert result["split"] == "test" and result["counts"]["matched"] == N_IMAGES // 5
    (row,) = [r for r in result["results"] if r["dataset"] == "synth"]
    return row["srcc"]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_tiny_model_learns_quality_from_random_init(synthetic, method):
    start = time.perf_counter()
    run = synthetic["tmp"] / f"run-{method}"
    data = ("--datasets", "synth", "--data-dir", str(synthetic["data"]), "--model", str(synthetic["model"]))
    proc = run_iqa("train", *data, "--out", str(run), "--method", method, *COMMON, *METHODS[method],
                   env=ONE_THREAD, timeout=TIMEOUT, progress=lambda: last_train_record(run))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    predictions = synthetic["tmp"] / f"pred-{method}.parquet"
    proc = run_iqa("score", "--from", str(synthetic["test"]), "--root", str(synthetic["images"]), "--model", str(run),
                   "--out", str(predictions), "--workers", "0", "--quiet", env=ONE_THREAD, timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    srcc = _eval_srcc(synthetic, predictions, "score")
    print(f"{method}: SRCC {srcc:.4f} in {time.perf_counter() - start:.1f} s")
    assert srcc >= 0.9
    if method == "qscorer":  # the regressor, read where it was trained (iqa.json regressor "last")
        srcc_reg = _eval_srcc(synthetic, predictions, "score_reg")
        print(f"{method} regressor: SRCC {srcc_reg:.4f}")
        assert srcc_reg >= 0.9
