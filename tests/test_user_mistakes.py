"""The mistakes a new user makes, on a fresh clone, command by command: each is one line on stderr that names what is
wrong (the value, the file, the flag) and what would do, exit code 2, no traceback, and nothing half-written.

The commands run in this process (`iqa_cli.cli.main`, the console script's entry point), in a folder laid out as
a new user's: `photos/`, a file `afile`, a list `list.csv`, a tiny model `iqa-demo/run`, a prepared dataset,
predictions and a ground-truth CSV. A full disk is simulated (the real write's `fsync` raises ENOSPC).
`/proc` stands for a place no one may write in, root included.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint
from iqa_cli.synthetic import make_synthetic_iqa

PREPARE = ["prepare", "custom", "--csv", "src/scores.csv", "--images", "src/images", "--image-col", "image",
           "--mos-col", "mos", "--name", "synth"]  # fmt: skip
SCORE = ["score", "photos", "--out", "s.parquet"]
TRAIN = ["train", "--datasets", "synth", "--data-dir", "data", "--model", "iqa-demo/run", "--out", "run"]
EVAL = ["eval", "preds.parquet", "--gt", "gt.csv"]

# (arguments, exit code, a part of the one line)
MISTAKES = [
    # iqa score
    (["score"], 2, "Missing option '--out' / '-o'. (see `iqa score -h`)"),
    (["score", "photos"], 2, "Missing option '--out'"),
    (["score", "nope", "--out", "s.parquet"], 2, "input not found: nope"),
    (["score", "--out", "s.parquet"], 2, "no inputs: give image folders or files, or --from FILE"),
    (["score", "photos", "--out", "s.txt"], 2, "--out s.txt: unknown suffix '.txt'"),
    (["score", "photos", "--out", "scores"], 2, "no suffix to tell the format"),
    (["score", "photos", "--out", "afile/s.parquet"], 2, "--out afile/s.parquet: afile is a file, not a folder"),
    (["score", "photos", "--out", "afile/"], 2, "--out afile: is a file, not a folder"),
    (["score", "photos", "--out", "/proc/s.parquet"], 2, "--out /proc/s.parquet: cannot write in folder /proc ("),
    ([*SCORE, "--batch-size", "0"], 2, "--batch-size 0: use a positive integer or 'auto'"),
    ([*SCORE, "--batch-size", "lots"], 2, "--batch-size lots: use a positive integer or 'auto'"),
    ([*SCORE, "--batch-siz", "4"], 2, "No such option: --batch-siz (Possible options: --batch-size)"),
    ([*SCORE, "--workers", "-1"], 2, "--workers -1: use 0 (decode in the main process) or more"),
    ([*SCORE, "--format", "xlsx"], 2, "--format xlsx"),
    ([*SCORE, "--device", "gpu0"], 2, "--device 'gpu0': not a torch device"),
    ([*SCORE, "--dtype", "int4"], 2, "--dtype int4"),
    ([*SCORE, "--dtype"], 2, "Option '--dtype' requires an argument."),
    ([*SCORE, "--model", "iqa-demo/runn"], 2, "model folder not found: iqa-demo/runn (did you mean iqa-demo/run?)"),
    ([*SCORE, "--model", "./iqa-dem/run"], 2, "model folder not found: ./iqa-dem/run"),
    ([*SCORE, "--model", "photos/p0.png"], 2, "model photos/p0.png: is a file; give the model's folder"),
    ([*SCORE, "--model", "iqa-demo/run", "--base", "iqa-demo/run"], 2, "a base applies to LoRA adapters only"),
    ([*SCORE, "--model", "iqa-demo/run", "--min-pixels", "1000"], 2, "--min-pixels does not apply to mplug_owl2"),
    (
        ["score", "list.csv", "--out", "s.parquet"],
        2,
        "list.csv is a list, not an image: to score the images it names, use --from list.csv",
    ),
    (["score", "--from", "nope.csv", "--out", "s.parquet"], 2, "nope.csv"),
    ([*SCORE, "--keep", "score"], 2, "--keep score: the output has a column 'score' of its own"),
    ([*SCORE, "--image-col", "jpeg"], 2, "--image-col jpeg: names the image column of Parquet inputs"),
    # iqa prepare
    (["prepare"], 2, "Missing argument 'DATASET'."),
    (["prepare", "konIQ10k", "--csv", "x.csv"], 2, "unknown dataset preset 'konIQ10k' (did you mean koniq?"),
    (["prepare", "kadid-10k", "--csv", "x.csv"], 2, "(did you mean kadid?"),
    (["prepare", "koniq", "--csv", "nope.csv"], 2, "nope.csv"),
    (["prepare", "custom", "--csv", "src/scores.csv"], 2, "the custom dataset needs --image-col and --mos-col"),
    ([*PREPARE[:-4], "--mos-col", "quality"], 2, "missing column 'quality' (columns found: image, mos, std)"),
    ([*PREPARE, "--data-dir", "afile"], 2, "--data-dir afile: is a file, not a folder"),
    ([*PREPARE, "--out", "afile/x.parquet"], 2, "--out afile/x.parquet: afile is a file, not a folder"),
    ([*PREPARE, "--data-dir", "/proc"], 2, "--data-dir /proc: cannot write in folder /proc"),
    ([*PREPARE, "--levels", "1"], 2, "--levels must be from 2 to 12, got 1"),
    ([*PREPARE, "--density", "gauss"], 2, "--density must be one of cdf, pdf"),
    ([*PREPARE, "--label-rule", "paper"], 2, "--label-rule must be one of reference, renormalized"),
    ([*PREPARE, "--test-frac", "2"], 2, "--test-frac must be from 0 to 1"),
    ([*PREPARE, "--split", "nope.json"], 2, "nope.json"),
    # iqa train
    (["train", "--out", "run"], 2, "Missing option '--datasets'."),
    (["train", "--datasets", "nope", "--data-dir", "data", "--out", "run"], 2, "unknown dataset 'nope'"),
    ([*TRAIN[:-1], "afile"], 2, "--out afile: is a file"),
    ([*TRAIN[:-1], "afile/run"], 2, "afile is a file, not a folder"),
    ([*TRAIN[:-1], "/proc/run"], 2, "--out /proc/run: cannot write in folder /proc"),
    ([*TRAIN, "--method", "deqa2"], 2, "--method must be one of deqa, qalign, qscorer, grpo, got 'deqa2'"),
    ([*TRAIN, "--epochs", "0"], 2, "--epochs must be >= 1, got 0"),
    ([*TRAIN, "--epochs", "two"], 2, "Invalid value for '--epochs'"),
    ([*TRAIN, "--lr", "0"], 2, "--lr must be > 0"),
    ([*TRAIN, "--resume", "--overwrite"], 2, "--resume and --overwrite exclude each other"),
    ([*TRAIN, "--merge"], 2, "--merge applies to --lora runs"),
    ([*TRAIN[:-3], "iqa-demo/runn", "--out", "run"], 2, "model folder not found: iqa-demo/runn (did you mean"),
    ([*TRAIN, "--data-weights", "x"], 2, "--data-weights expects comma-separated integers, got 'x'"),
    # iqa eval
    (["eval"], 2, "Missing argument 'FILE'. (see `iqa eval -h`)"),
    (["eval", "nope.parquet"], 2, "predictions file not found: nope.parquet"),
    (["eval", "preds.parquet"], 2, "holds no ground truth (no mos/mos_norm column); pass --gt"),
    (["eval", "preds.parquet", "--gt", "nope.csv"], 2, "ground truth file not found: nope.csv"),
    ([*EVAL, "--column", "quality"], 2, "--column must be one of score, score_reg"),
    ([*EVAL, "--split", "val"], 2, "--split must be one of test, train, all, got 'val'"),
    ([*EVAL, "--json", "afile/m.json"], 2, "--json afile/m.json: afile is a file, not a folder"),
    ([*EVAL, "--plot", "m.xyz"], 2, "--plot m.xyz: matplotlib cannot write .xyz files"),
    (["eval", "empty", "--gt", "gt.csv"], 2, "predictions folder empty holds no .parquet file"),
    (["eval", "preds.parquet", "--gt", "list.csv"], 2, "has no column 'mos'"),
    # iqa demo
    (["demo", "afile"], 2, "afile is a file; iqa demo needs a new or empty folder"),
    (["demo", "afile/demo"], 2, "iqa demo afile/demo: afile is a file, not a folder"),
    (["demo", "/proc/demo"], 2, "iqa demo /proc/demo: cannot write in folder /proc"),
    (["demo", "photos"], 2, "photos is not empty and holds no earlier demo"),
    # iqa serve
    (["serve", "--model", "iqa-demo/runn"], 2, "model folder not found: iqa-demo/runn (did you mean iqa-demo/run?)"),
    (["serve", "--model", "photos/p0.png"], 2, "is a file"),
    (["serve", "--model", "iqa-demo/run", "--devices", "gpu7"], 2, "--devices: 'gpu7' is not a device"),
    (["serve", "--model", "iqa-demo/run", "--port", "70000"], 2, "--port 70000: choose 1..65535"),
    (["serve", "--model", "iqa-demo/run", "--max-batch", "0"], 2, "--max-batch 0: must be at least 1"),
    (["serve", "--model", "iqa-demo/run", "--devices", ","], 2, "--devices is empty: give auto, cpu"),
    (["serve", "--model", "iqa-demo/run", "--call-sizes", "eight"], 2, "--call-sizes expects comma-separated integers"),
    (["serve", "--model", "iqa-demo/run", "--call-sizes", "8,128"], 2, "--call-sizes 128: each must be between 1"),
    # iqa itself
    (["bogus"], 2, "No such command 'bogus'."),
    (["--install-completion", "tcsh"], 2, "unknown shell 'tcsh': use one of bash, zsh, fish"),
]


@pytest.fixture(scope="module")
def place(tmp_path_factory, iqa_module) -> Path:
    root = tmp_path_factory.mktemp("new-user")
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.png")
    (root / "afile").write_text("a file, not a folder")
    (root / "list.csv").write_text("image\nphotos/p0.png\n")
    (root / "empty").mkdir()
    write_tiny_checkpoint(root / "iqa-demo" / "run", image_size=28)
    make_synthetic_iqa(root / "src", 16, size=(30, 24))
    code, _, err = iqa_module(root, *PREPARE, "--data-dir", "data", "-q")
    assert code == 0, err
    names = [f"img{i:04d}.png" for i in range(16)]
    pd.DataFrame({"image": names, "score": np.linspace(1, 5, 16), "std": 0.5}).to_parquet(root / "preds.parquet")
    pd.DataFrame({"image": names, "mos": np.linspace(1, 5, 16) ** 1.1}).to_csv(root / "gt.csv", index=False)
    return root


@pytest.fixture(scope="module")
def iqa_module():
    """`iqa(folder, *args)`: the console script's `main` in this process, run in `folder`; (code, out, err)."""
    import contextlib
    import io
    import sys

    from iqa_cli import cli

    def run(folder: Path, *args):
        saved = sys.argv, os.getcwd()
        out, err = io.StringIO(), io.StringIO()
        sys.argv = ["iqa", *map(str, args)]
        os.chdir(folder)
        code = 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                cli.main()
        except SystemExit as exc:
            code = exc.code or 0
        finally:
            sys.argv = saved[0]
            os.chdir(saved[1])
        return code, out.getvalue(), err.getvalue()

    return run


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(("args", "code", "part"), MISTAKES, ids=[" ".join(m[0])[:60] for m in MISTAKES])
def test_a_mistake_is_one_line_exit_2_and_nothing_written(place, iqa_module, args, code, part):
    before = _listing(place)
    got, out, err = iqa_module(place, *args)
    lines = err.strip().splitlines()
    assert got == code, (got, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert part in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _listing(place) == before, _listing(place) ^ before  # nothing written, nothing left behind


def test_a_disk_that_fills_up_during_a_run_is_one_line_and_the_rerun_goes_on(place, iqa_module, monkeypatch):
    """ENOSPC while the run writes (its second durable write: the first unit after the manifest): one line naming
    --out, exit 2, no temporary file left; the same command then finishes."""
    from iqa_cli import files

    real, calls = files.fsync_file, []

    def fill_up(path):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path)

    monkeypatch.setattr(files, "fsync_file", fill_up)
    args = ["score", "photos", "--out", "full.parquet", "--model", "iqa-demo/run", "--workers", "0", "-q"]
    code, _, err = iqa_module(place, *args)
    assert code == 2 and err == "error: cannot write full.parquet: no space left on the device\n", err
    assert not list(place.rglob("*.tmp")) and not (place / "full.parquet").exists()
    monkeypatch.setattr(files, "fsync_file", real)
    code, _, err = iqa_module(place, *args)
    assert code == 0, err
    assert pq.read_metadata(place / "full.parquet").num_rows == 2

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", no_space)
    code, _, err = iqa_module(place, *PREPARE, "--data-dir", "full", "-q")
    assert code == 2 and err == "error: cannot write full/synth.parquet: no space left on the device\n", err
    assert not list((place / "full").iterdir())


def test_a_failed_write_names_the_file_and_why_and_other_os_errors_stay_bugs():
    from iqa_cli.paths import write_error

    arrow = OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")  # no errno set
    assert str(write_error(arrow, "out.parquet")) == "cannot write out.parquet: no space left on the device"
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/s.parquet")
    assert str(write_error(read_only)) == "cannot write /mnt/ro/s.parquet: read-only file system"
    refused = OSError(errno.EACCES, os.strerror(errno.EACCES), "list.txt")  # a read as much as a write
    assert str(write_error(refused)) == "list.txt: permission denied"
    assert write_error(OSError(errno.EINVAL, "Invalid argument")) is None


def test_a_disk_that_fills_up_while_training_is_one_line_and_the_rerun_resumes(place, iqa_module, monkeypatch):
    """ENOSPC while `iqa train` writes its checkpoint (torch.distributed.checkpoint hands it back wrapped in a
    CheckpointException, a BaseException) and then its final model (safetensors' SafetensorError): one line naming
    --out, exit 2, the half-written checkpoint removed; after the second, the rerun resumes and finishes."""
    import safetensors.torch
    import torch.distributed.checkpoint as dcp
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException

    def checkpoint_on_a_full_disk(*args, **kwargs):
        raise CheckpointException("CheckpointException ranks:dict_keys([0])", {0: (_no_space(), None)})

    def model_on_a_full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    args = [*TRAIN[:-1], "full-run", "--max-steps", "1", "--batch-size", "2", "--workers", "0", "--no-eval",
            "--no-gradient-checkpointing", "--layout", "scoring", "-q"]  # fmt: skip
    real_save_file = safetensors.torch.save_file
    monkeypatch.setattr(dcp, "save", checkpoint_on_a_full_disk)
    code, _, err = iqa_module(place, *args)
    assert code == 2 and err == "error: cannot write full-run: no space left on the device\n", err
    assert not list((place / "full-run" / "checkpoints").iterdir())  # no .step-N.tmp left holding the space

    monkeypatch.undo()
    monkeypatch.setattr(safetensors.torch, "save_file", model_on_a_full_disk)
    code, _, err = iqa_module(place, *args)
    assert code == 2 and err == "error: cannot write full-run: no space left on the device\n", err
    assert not (place / "full-run" / "iqa.json").exists()  # not taken for a finished run

    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    code, _, err = iqa_module(place, *args)
    assert code == 0, err
    assert (place / "full-run" / "iqa.json").exists() and (place / "full-run" / "model.safetensors").exists()


def test_a_checkpoint_file_on_a_full_disk_is_an_os_error_that_says_so():
    """torch.save given a path reports a failed write as a RuntimeError without the reason; through a Python file
    it is the OSError (ENOSPC) that becomes the one line. /dev/full fails every write with ENOSPC."""
    import torch

    from iqa_cli.training.state import _torch_save

    if not Path("/dev/full").is_char_device():
        pytest.skip("no /dev/full on this system")
    with pytest.raises(OSError) as failed:
        _torch_save({"step": torch.zeros(3)}, Path("/dev/full"))
    assert failed.value.errno == errno.ENOSPC


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
