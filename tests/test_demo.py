"""`iqa demo`: the whole loop from a fresh folder, as README's first ten minutes promise it.

The real CLI in a subprocess writes the synthetic data and the tiny random-init checkpoint, runs the four
commands and prints them; the test checks the files each step leaves, that the printed commands are the
ones that ran (in order, copyable), and the printed SRCC against scipy on the written predictions and the
prepared meta; then README.md's transcript must be the printed one and every example command README shows
must run as written on these files. This run is also the proof that DeQA-Score training learns quality
from random weights (the settings are the learnability test's; SRCC 0.94-0.95 measured).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from iqa_cli import demo
from tests.conftest import REPO_ROOT, last_train_record, run_iqa

TIMEOUT = 1500  # s: about 10x an idle 2-core machine's time, for a loaded CI machine


def _files_so_far(root: Path) -> str:
    done = [name for name in ("tiny-mplug-owl2", "iqa-data", "run", "predictions.parquet", "eval.json")
            if (root / name).exists()]  # fmt: skip
    return f"written: {done or 'nothing'}; training: {last_train_record(root / 'run')}"


@pytest.mark.slow
def test_demo_runs_the_whole_loop_prints_copyable_commands_and_learns(tmp_path):
    import pandas as pd
    from scipy.stats import spearmanr

    root = tmp_path / "iqa-demo"  # README's paths: the default folder, given relative to the working directory
    proc = run_iqa("demo", "iqa-demo", cwd=tmp_path, timeout=TIMEOUT, progress=lambda: _files_so_far(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout

    # The inputs: the synthetic dataset and a released-layout checkpoint.
    assert len(list((root / "data" / "images").glob("*.png"))) == demo.N_IMAGES
    scores = pd.read_csv(root / "data" / "scores.csv")
    assert list(scores.columns) == ["image", "mos", "std"] and len(scores) == demo.N_IMAGES
    model = root / "tiny-mplug-owl2"
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "preprocessor_config.json"):  # fmt: skip
        assert (model / name).is_file(), name
    assert json.loads((model / "preprocessor_config.json").read_text())["crop_size"] == demo.MODEL_SIDE

    # The printed commands are the four steps, in order, and parse back to what the demo ran.
    printed = [line[2:] for line in out.splitlines() if line.startswith("$ ")]
    expected = [demo.command_line(env, args) for env, args in demo.commands(demo.DemoPaths(Path("iqa-demo")))]
    assert printed == expected
    assert [shlex.split(line)[shlex.split(line).index("iqa") + 1] for line in printed] == [
        "prepare", "train", "score", "eval"]  # fmt: skip

    # What each step left.
    meta = pd.read_parquet(root / "iqa-data" / "demo.parquet")
    assert len(meta) == demo.N_IMAGES and set(meta["split"]) == {"train", "test"}
    assert (root / "run" / "iqa.json").is_file() and (root / "run" / "model.safetensors").is_file()
    predictions = pd.read_parquet(root / "predictions.parquet")
    assert len(predictions) == demo.N_IMAGES and predictions["error"].isna().all()
    report = json.loads((root / "eval.json").read_text())
    (row,) = report["results"]

    # The printed SRCC is scipy's on the held-out rows, and it shows learning.
    test = meta[meta["split"] == "test"].merge(predictions, on="image")
    assert len(test) == row["n"] == demo.N_IMAGES // 5
    srcc = spearmanr(test["score"], test["mos_norm"]).statistic
    assert np.isclose(row["srcc"], srcc, atol=1e-9)
    match = re.search(r"reaches SRCC (\d\.\d{3}), PLCC (\d\.\d{3}) on (\d+) held-out images", out)
    assert match, out[-2000:]
    assert float(match.group(1)) == pytest.approx(srcc, abs=5e-4)
    assert int(match.group(3)) == row["n"]
    assert srcc >= 0.9

    # A second run in the same folder reuses it: no new data, the finished run and scores are kept.
    stamp = (root / "run" / "model.safetensors").stat().st_mtime_ns
    again = run_iqa("demo", "iqa-demo", cwd=tmp_path, timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds an earlier demo" in again.stdout and "nothing to do" in again.stderr
    assert (root / "run" / "model.safetensors").stat().st_mtime_ns == stamp
    assert f"reaches SRCC {match.group(1)}" in again.stdout
    first = re.search(r"an untrained one: about 0\), in (\d+) s\.", out)
    assert first, out[-500:]  # the rerun reports the first run's time, not its own few seconds
    assert f"in {first.group(1)} s (the first run; this one reused its results in " in again.stdout

    # README shows this transcript and runs every example on these files: they must run as written.
    readme = _readme_commands()
    assert readme[0] == "iqa demo" and readme[1 : len(printed) + 1] == printed
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for line in readme[len(printed) + 1 :]:
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, f"README command failed: {line}\n{done.stderr[-2000:]}"


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path, iqa):
    (tmp_path / "mine.txt").write_text("keep me")
    code, out, err = iqa("demo", tmp_path)
    assert code == 2 and out == ""
    assert err.strip() == f"error: {tmp_path} is not empty and holds no earlier demo; give a new or empty folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    (tmp_path / "file").write_text("")
    code, _, err = iqa("demo", tmp_path / "file")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'file'} is a file; iqa demo needs a new or empty folder"


def _readme_commands() -> list[str]:
    """Every `$ ` line of README.md's console blocks, in order."""
    blocks = re.findall(r"```console\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    return [line[2:] for block in blocks for line in block.splitlines() if line.startswith("$ ")]


def test_a_command_that_overruns_fails_with_its_progress_instead_of_a_bare_timeout(tmp_path):
    """run_iqa's timeout report, which the slow tests rely on: the stage reached and the stderr so far."""
    with pytest.raises(pytest.fail.Exception) as failure:
        run_iqa("demo", str(tmp_path / "d"), timeout=1, progress=lambda: "stage X")
    assert str(failure.value).startswith("iqa demo did not finish in 1 s; reached: stage X\nstderr so far")
