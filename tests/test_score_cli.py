"""`iqa score` as a user runs it: a subprocess, its files and exit codes, one-line errors for bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from iqa_cli.cli import app
from iqa_cli.errors import UserError
from tests.conftest import run_iqa

# cli.main() prints errors with rich, which wraps at the terminal width (80 in a pipe); a wide terminal shows
# whether the message itself is one line.
WIDE = {"COLUMNS": "400"}


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
    (["{photos}", "--out", "{tmp}/file.txt/s.parquet"], ["cannot create folder", "file.txt"]),
    (["{photos}", "--out", "{tmp}"], ["is a directory"]),
    (["--out", "{tmp}/s.parquet"], ["no inputs"]),
    (["--from", "{tmp}/list.csv", "--out", "{tmp}/s.parquet"], ["--from", "list.csv", "not found"]),
    (["{photos}", "--out", "{tmp}/s.parquet", "--dtype", "int4"], ["--dtype int4"]),
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
    _one_line_error(run_iqa("score", *args, env=WIDE, timeout=120), *fragments)


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root can write anywhere")
def test_unwritable_output_folder_is_refused(tmp_path, photos):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _one_line_error(run_iqa("score", str(photos), "--out", str(locked / "s.parquet"), env=WIDE), "not writable")
    finally:
        locked.chmod(0o700)


def test_existing_foreign_output_is_refused(tmp_path, photos):
    out = tmp_path / "s.parquet"
    out.write_text("not ours")
    _one_line_error(
        run_iqa("score", str(photos), "--out", str(out), env=WIDE, timeout=120), "not written by `iqa score`"
    )
    assert out.read_text() == "not ours"
