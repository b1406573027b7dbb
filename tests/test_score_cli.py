"""`iqa score` as a user runs it: a subprocess, its files and exit codes, one-line errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from iqa_cli import __version__
from iqa_cli.cli import app
from iqa_cli.errors import UserError
from tests.conftest import REPO_ROOT, run_iqa

LEVELS = ["bad", "poor", "fair", "good", "excellent"]


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


BAD_INPUTS = [
    (["{tmp}/nope", "--out", "{tmp}/s.parquet"], ["input not found", "nope"]),
    (["{tmp}/empty", "--out", "{tmp}/s.parquet"], ["no images found", "empty"]),
    (["{photos}", "--out", "{tmp}/s.parquet", "--batch-size", "0"], ["--batch-size 0"]),
    (["{photos}", "--out", "{tmp}/s.parquet", "--batch-size", "-4"], ["--batch-size -4"]),
    (["{photos}", "--out", "{tmp}/s.parquet", "--format", "xlsx"], ["--format xlsx", "parquet, csv, jsonl"]),
    (
        ["{photos}", "--out", "{tmp}/s.txt"],
        ["--out", "unknown suffix '.txt'", ".parquet, .pq, .csv, .jsonl, .ndjson", "--format"],
    ),
    (["{photos}", "--out", "{tmp}/scores"], ["--out", "scores: no suffix to tell the format", "--format"]),
    (["{photos}", "--out", "{tmp}/file.txt/s.parquet"], ["file.txt is a file, not a folder"]),
    (["{photos}", "--out", "{tmp}", "--format", "csv"], ["--format csv", "one Parquet file per unit"]),
    (["{photos}", "--out", "{tmp}/file.txt/"], ["--out", "file.txt", "is a file, not a folder"]),
    (["--out", "{tmp}/s.parquet"], ["no inputs"]),
    (["--from", "{tmp}/list.csv", "--out", "{tmp}/s.parquet"], ["--from", "list.csv", "not found"]),
    (["{photos}", "--out", "{tmp}/s.parquet", "--dtype", "int4"], ["--dtype int4"]),
    (["{photos}", "--out", "{tmp}/s.parquet", "--device", "gpu0"], ["--device 'gpu0'", "not a torch device"]),
]


def _bad_input_args(tmp_path, photos, args):
    (tmp_path / "empty").mkdir(exist_ok=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "file.txt").write_text("a file, not a folder")
    return [a.format(tmp=tmp_path, photos=photos) for a in args]


@pytest.mark.parametrize(("args", "fragments"), BAD_INPUTS)
def test_bad_input_raises_a_one_line_user_error(tmp_path, photos, args, fragments):
    result = CliRunner().invoke(app, ["score", *_bad_input_args(tmp_path, photos, args)])
    assert isinstance(result.exception, UserError), result.output
    message = str(result.exception)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert not list(tmp_path.glob("s.parquet*"))


@pytest.mark.parametrize(("args", "fragments"), [BAD_INPUTS[0], BAD_INPUTS[2]])
def test_bad_input_is_one_line_and_exit_2_in_a_subprocess(tmp_path, photos, args, fragments):
    args = _bad_input_args(tmp_path, photos, args)
    _one_line_error(run_iqa("score", *args, timeout=120), *fragments)


def test_unwritable_output_folder_is_refused(tmp_path, photos):
    if os.geteuid() == 0:  # root writes through permission bits; /proc refuses new files even to root
        _one_line_error(run_iqa("score", str(photos), "--out", "/proc/s.parquet"), "cannot write in folder")
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _one_line_error(run_iqa("score", str(photos), "--out", str(locked / "s.parquet")), "cannot write in folder")
    finally:
        locked.chmod(0o700)


def test_existing_foreign_output_is_refused(tmp_path, photos):
    out = tmp_path / "s.parquet"
    out.write_text("not ours")
    _one_line_error(run_iqa("score", str(photos), "--out", str(out), timeout=120), "not written by `iqa score`")
    assert out.read_text() == "not ours"


# --- the real CLI on a tiny checkpoint in the released layout ----------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A DeQA-style full checkpoint, a second one with other weights, and a Q-Scorer LoRA checkpoint."""
    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
    from iqa_cli.models.mplug_owl2.tokenizer import LlamaTokenizer
    from tests.factories import tiny_model, write_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    tokenizer = build_tiny_tokenizer(root / "tok")
    vocab = len(LlamaTokenizer.from_dir(tokenizer))
    qscorer = tiny_model(seed=6, vocab_size=vocab + 5, deepmlp_hidden_dims=[48, 48])
    return {
        "deqa": write_checkpoint(tiny_model(seed=3), root / "deqa", tokenizer_dir=tokenizer),
        "other": write_checkpoint(tiny_model(seed=4), root / "other", tokenizer_dir=tokenizer),
        "qscorer": write_checkpoint(qscorer, root / "q", layout="qscorer_lora", tokenizer_dir=tokenizer),
    }


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    from tests.test_score_pipeline import make_image_folder

    root = tmp_path_factory.mktemp("mixed") / "photos"
    return root, make_image_folder(root)


def _api_scores(checkpoint, folder, names):
    """The Scorer API on the same files, one image per call (no batching at all)."""
    from iqa_cli.scoring.scorer import Scorer

    scorer = Scorer.from_pretrained(checkpoint.path, base=checkpoint.base, device="cpu", dtype="float32")
    return {name: scorer.score([folder / name], batch_size=1)[0] for name in names}


def _score_cli(folder, out, checkpoint, *extra, **kwargs):
    args = ["score", str(folder), "--out", str(out), "--model", str(checkpoint.path), "--device", "cpu"]
    if checkpoint.base is not None:
        args += ["--base", str(checkpoint.base)]
    return run_iqa(*args, "--dtype", "float32", *extra, timeout=300, **kwargs)


def _score_in_process(folder, out, checkpoint, *extra):
    """The same command through Typer in this process (saves a subprocess's start-up)."""
    args = ["score", str(folder), "--out", str(out), "--model", str(checkpoint.path), "--device", "cpu"]
    return CliRunner().invoke(app, [*args, "--dtype", "float32", *extra])


@pytest.mark.slow
def test_cli_scores_equal_the_scorer_api_and_do_not_depend_on_batch_size(tiny_checkpoints, mixed_folder, tmp_path):
    import pandas as pd
    import pyarrow.parquet as pq

    folder, expected = mixed_folder
    ckpt = tiny_checkpoints["deqa"]
    first, second = tmp_path / "b3.parquet", tmp_path / "b8.parquet"
    result = _score_cli(folder, first, ckpt, "--batch-size", "3", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"scored 20 of {len(expected)} images (5 failed)" in result.stderr
    assert "failed: broken/" in result.stderr
    result = _score_in_process(folder, second, ckpt, "--batch-size", "8", "--workers", "0", "--quiet")
    assert result.exit_code == 0 and result.output == "", result.output

    frame = pd.read_parquet(first)
    assert sorted(frame["image"]) == sorted(expected) and frame["image"].is_unique
    failed = frame[frame["error"].notna()]
    assert sorted(failed["image"]) == sorted(n for n, e in expected.items() if e)
    for row in failed.itertuples():
        assert expected[row.image] in row.error
    ok = frame[frame["error"].isna()]
    api = _api_scores(ckpt, folder, ok["image"])
    for row in ok.itertuples():
        want = api[row.image]
        assert row.score == pytest.approx(want.score, abs=1e-5), row.image
        assert row.std == pytest.approx(want.std, abs=1e-5)
        np.testing.assert_allclose(row.probs, want.probs, atol=1e-5, rtol=0)
        assert row.level == want.level and (row.width, row.height) == (want.width, want.height)

    other = pd.read_parquet(second)
    assert other["image"].tolist() == frame["image"].tolist()
    np.testing.assert_allclose(other["score"].to_numpy(float), frame["score"].to_numpy(float), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.stack(other["probs"].dropna()), np.stack(frame["probs"].dropna()), atol=1e-5)

    meta = {k.decode(): v.decode() for k, v in pq.read_schema(first).metadata.items()}
    assert meta["dtype"] == "float32" and json.loads(meta["level_names"]) == LEVELS
    assert meta["model"] == str(ckpt.path.resolve()) and meta["iqa_version"] == __version__
    assert "<|image|>" in meta["prompt"]

    # Re-running the finished command does nothing; another model is refused; --overwrite replaces.
    before = first.stat().st_mtime_ns
    result = _score_cli(folder, first, ckpt, "--batch-size", "3")
    assert result.returncode == 0 and "is complete" in result.stderr and first.stat().st_mtime_ns == before
    result = _score_cli(folder, first, tiny_checkpoints["other"])
    _one_line_error(result, "exists and was written with another model (", "--overwrite")
    result = _score_in_process(folder, first, tiny_checkpoints["other"], "--overwrite", "--quiet")
    assert result.exit_code == 0 and first.stat().st_mtime_ns != before


@pytest.mark.slow
def test_cli_writes_score_reg_for_a_qscorer_checkpoint(tiny_checkpoints, mixed_folder, tmp_path):
    import pandas as pd

    folder, _ = mixed_folder
    ckpt = tiny_checkpoints["qscorer"]
    out = tmp_path / "q.jsonl"
    result = _score_cli(folder / "many", out, ckpt, "--batch-size", "4", "--workers", "1")
    assert result.returncode == 0, result.stderr
    frame = pd.read_json(out, lines=True, dtype=False)
    assert list(frame.columns)[-1] == "score_reg"
    api = _api_scores(ckpt, folder / "many", frame["image"])
    for row in frame.itertuples():
        assert row.score_reg == pytest.approx(api[row.image].score_reg, abs=1e-5)
        assert row.score == pytest.approx(api[row.image].score, abs=1e-5)
    assert json.loads(Path(f"{out}.meta.json").read_text())["regressor_readout"] == "appended"


def test_cli_exits_1_when_every_image_fails(tiny_checkpoints, tmp_path):
    import pandas as pd

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    (folder / "b.png").write_text("text")
    # more pixels than Pillow's MAX_IMAGE_PIXELS, fewer than twice: Pillow warns (DecompressionBombWarning) and
    # would decode it; the warning never reaches the screen and the image is an error row (a 1-bit PNG: 11 KB)
    Image.new("1", (10_000, 9_000)).save(folder / "c.png")
    out = tmp_path / "s.csv"
    result = _score_cli(folder, out, tiny_checkpoints["deqa"])
    assert result.returncode == 1, result.stderr
    assert "none of the 3 images could be read" in result.stderr
    assert "Warning" not in result.stderr, result.stderr
    frame = pd.read_csv(out)
    assert frame["image"].tolist() == ["a.jpg", "b.png", "c.png"] and frame["score"].isna().all()
    assert frame["error"].notna().all() and frame["error"].iloc[2].startswith("decompression bomb: 10000x9000")


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tiny_checkpoints, mixed_folder, tmp_path):
    import subprocess
    import sys

    import pandas as pd

    folder, _ = mixed_folder
    ckpt = tiny_checkpoints["deqa"]
    single, double = tmp_path / "one.parquet", tmp_path / "two.parquet"
    assert _score_cli(folder, single, ckpt, "--workers", "1", "--quiet").returncode == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = ["-m", "iqa_cli", "score", str(folder), "--out", str(double), "--model", str(ckpt.path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launcher, *args, "--device", "cpu", "--dtype", "float32", "--workers", "1", "--batch-size", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    a, b = pd.read_parquet(single), pd.read_parquet(double)
    assert a["image"].tolist() == b["image"].tolist() and a["error"].equals(b["error"])
    np.testing.assert_allclose(a["score"].to_numpy(float), b["score"].to_numpy(float), atol=1e-5, rtol=0)
    assert not Path(f"{double}.parts").exists()


def test_checkpoint_resaved_into_the_same_directory_is_not_taken_as_finished(tmp_path, photos):
    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
    from tests.factories import tiny_model, write_checkpoint

    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    ckpt = write_checkpoint(tiny_model(seed=3), tmp_path / "run", tokenizer_dir=tokenizer)
    out = tmp_path / "s.parquet"
    result = _score_in_process(photos, out, ckpt, "--quiet", "--workers", "0")
    assert result.exit_code == 0, result.output
    write_checkpoint(tiny_model(seed=4), tmp_path / "run", tokenizer_dir=tokenizer)  # retrained, same path
    result = _score_in_process(photos, out, ckpt, "--quiet", "--workers", "0")
    assert isinstance(result.exception, UserError)
    assert f"exists and was written with other files in model folder {ckpt.path.resolve()} (retrained" in str(
        result.exception
    )


# --- overlapping runs, small runs, output suffixes -------------------------------------------------


def _lock_pid(out: Path) -> int | None:
    try:
        return json.loads((out.with_name(out.name + ".parts") / ".iqa-lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)


@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused_and_with_wait_waits_for_the_first(tiny_checkpoints, photos, tmp_path):
    ckpt = tiny_checkpoints["deqa"]
    out = tmp_path / "s.parquet"
    args = ["-m", "iqa_cli", "score", str(photos), "--out", str(out), "--model", str(ckpt.path)]
    args += ["--device", "cpu", "--dtype", "float32", "--workers", "0"]
    first_log, third_log = tmp_path / "first.log", tmp_path / "third.log"
    with first_log.open("w") as log:
        first = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stderr=log)
    third = None
    try:
        _wait_for(lambda: _lock_pid(out) == first.pid, first, first_log)
        first.send_signal(signal.SIGSTOP)  # the first run, mid-way, holds the lock as long as the test needs
        assert _lock_pid(out) == first.pid
        second = run_iqa(*args[2:], timeout=120)
        _one_line_error(second, f"--out {out} is in use by another iqa score run (pid {first.pid} on host", "--wait")

        with third_log.open("w") as log:
            third = subprocess.Popen([sys.executable, *args, "--wait"], cwd=REPO_ROOT, stderr=log)
        _wait_for(lambda: "waiting for another iqa score run" in third_log.read_text(), third, third_log)
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=120) == 0, first_log.read_text()
        assert third.wait(timeout=120) == 0, third_log.read_text()
    finally:
        first.send_signal(signal.SIGCONT)
        first.kill()
        if third is not None:
            third.kill()
    assert "scored 3 of 3 images (0 failed)" in first_log.read_text()
    text = third_log.read_text()
    assert text.count("waiting for another iqa score run") == 1
    assert text.strip().endswith("is complete (3 rows); nothing to do (--overwrite recomputes it)"), text
    assert not out.with_name("s.parquet.parts").exists()

    import pandas as pd

    reference = tmp_path / "reference.parquet"
    assert _score_in_process(photos, reference, ckpt, "--quiet", "--workers", "0").exit_code == 0
    a, b = pd.read_parquet(out), pd.read_parquet(reference)
    assert a["image"].tolist() == ["0.png", "1.png", "2.png"] == b["image"].tolist()
    np.testing.assert_array_equal(a["score"].to_numpy(), b["score"].to_numpy())
    np.testing.assert_array_equal(np.stack(a["probs"]), np.stack(b["probs"]))


def test_a_stale_lock_of_a_dead_run_is_taken_over(tiny_checkpoints, photos, tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "s.parquet"
    sidecar = tmp_path / "s.parquet.parts"
    sidecar.mkdir()
    holder = {"host": socket.gethostname(), "pid": dead.pid, "started": "2026-01-01T00:00:00+00:00", "command": "x"}
    (sidecar / ".iqa-lock").write_text(json.dumps(holder))
    result = _score_in_process(photos, out, tiny_checkpoints["deqa"], "--quiet", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert out.is_file() and not sidecar.exists()


def test_a_run_with_fewer_images_than_the_batch_size_calls_the_model_with_that_many_rows(
    tiny_checkpoints, photos, tmp_path
):
    """2 images: one call of 2 rows (not 16), scoring as the padded 16-row call did, within float32 rounding."""
    import pandas as pd
    import torch

    from iqa_cli.images import load_image
    from iqa_cli.scoring.config import ScoreConfig
    from iqa_cli.scoring.driver import score_images
    from iqa_cli.scoring.scorer import Scorer

    scorer = Scorer.from_pretrained(tiny_checkpoints["deqa"].path, device="cpu", dtype="float32")
    real, record, shapes = scorer.score_pixels, scorer.score_batch, []

    def recording(visual):
        shapes.append(tuple(visual["pixel_values"].shape))
        return record(visual)

    scorer.score_batch = recording
    files = [str(photos / "0.png"), str(photos / "1.png")]
    for batch_size in ("auto", 16):
        shapes.clear()
        out = tmp_path / f"two-{batch_size}.parquet"
        config = ScoreConfig(out=out, inputs=files, batch_size=batch_size, workers=0, quiet=True, device="cpu")
        score_images(config, scorer_factory=lambda device: scorer)
        assert [shape[0] for shape in shapes] == [2], batch_size

        pixels = torch.stack([scorer.preprocessor(load_image(f)) for f in files])
        padded = real(torch.cat([pixels, pixels.new_zeros(14, *pixels.shape[1:])]))  # the call made before
        frame = pd.read_parquet(out)
        np.testing.assert_allclose(frame["score"].to_numpy(float), padded.score[:2].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.stack(frame["probs"]), padded.probs[:2].numpy(), rtol=0, atol=1e-5)


def test_format_given_for_another_suffix_writes_that_format_and_says_so(tiny_checkpoints, photos, tmp_path, iqa):
    import pandas as pd

    out = tmp_path / "s.txt"
    code, _, err = iqa(
        "score", photos, "--out", out, "--model", tiny_checkpoints["deqa"].path, "--device", "cpu",
        "--workers", "0", "--format", "csv",
    )  # fmt: skip
    assert code == 0, err
    assert "warning: --out s.txt has suffix '.txt' but holds csv (--format csv)" in err
    assert pd.read_csv(out)["image"].tolist() == ["0.png", "1.png", "2.png"]
