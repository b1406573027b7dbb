"""A stop loses only work in flight: SIGTERM, SIGINT and SIGHUP, sent to the main process only or to its whole
process group (what Ctrl-C, `kill %1`, `timeout`, SLURM, systemd and Kubernetes do), for `iqa score` on files and
on shards, `iqa train` and `iqa serve`.

Each command runs as the real console script (`tests.forked_cli`, so each start costs milliseconds, not the
seconds of importing torch), with its decoding processes on, so that a signal to the group reaches them too. For
score and train the signal comes while work is in flight (a test hook slows each model call); the command must
exit with 128 + the signal's number and one line saying what was saved, keep every row its writer had accepted
(train: its checkpoints), and the same command must then do only the rest. `iqa serve` drains and exits 0.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint
from iqa_cli.scoring.store import sidecar_path
from iqa_cli.training.state import RunDirectory
from tests.conftest import REPO_ROOT
from tests.forked_cli import Launcher, rows_logged
from tests.test_train_data import prepare_synthetic

SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
TARGETS = ["main", "group"]
MATRIX = [pytest.param(s, t, id=f"{s.name}-{t}") for s in SIGNALS for t in TARGETS]
N_FILES, N_SHARDS, PER_SHARD = 40, 4, 8


@pytest.fixture(scope="module")
def launch():
    with Launcher(env={"OMP_NUM_THREADS": "1"}) as launcher:
        yield launcher


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stop-signals")
    rng = np.random.default_rng(0)

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    photos = root / "photos"
    photos.mkdir()
    for i in range(N_FILES):
        (photos / f"{i:03d}.png").write_bytes(png())
    shards = root / "shards"
    shards.mkdir()
    for s in range(N_SHARDS):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                data = png()
                info = tarfile.TarInfo(f"img{s}{i:03d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    model = write_tiny_checkpoint(root / "model", image_size=28)
    return {"root": root, "photos": photos, "shards": shards, "model": model}


def _wait_for(condition, run, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.poll() is None, f"exited {run.returncode} before {what}:\n{run.output()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{run.output()[-3000:]}"
        time.sleep(0.02)


def _assert_one_line(run, *fragments: str) -> str:
    text = run.output()
    assert "Traceback" not in text and "Error" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _saved_rows(out: Path) -> int:
    """Rows in the sidecar: finished units and pieces of unfinished ones."""
    return sum(pq.read_metadata(p).num_rows for p in sidecar_path(out).glob("unit-*.parquet"))


@pytest.mark.parametrize("kind", ["files", "shards"])
@pytest.mark.parametrize(("signum", "target"), MATRIX)
def test_score_keeps_every_written_row_and_the_rerun_scores_only_the_rest(
    launch, inputs, tmp_path, kind, signum, target
):
    source = [str(inputs["photos"])] if kind == "files" else sorted(map(str, inputs["shards"].glob("*.tar")))
    total = N_FILES if kind == "files" else N_SHARDS * PER_SHARD
    out, written = tmp_path / "scores.parquet", tmp_path / "written.log"
    command = ["score", *source, "--out", out, "--model", inputs["model"], "--batch-size", "2", "--workers", "2", "-q"]
    run = launch(*command, log=tmp_path / "stopped.log",
                 hooks=[("slow_scoring", 0.1), ("log_written_rows", str(written))])  # fmt: skip
    _wait_for(lambda: rows_logged(written) >= 8, run, "rows scored")
    run.signal(signum, group=target == "group")
    assert run.wait() == 128 + signum
    _assert_one_line(run, f"interrupted by {signum.name}; finished images are saved in {sidecar_path(out)}",
                     "run the same command to resume")  # fmt: skip
    kept = _saved_rows(out)
    assert rows_logged(written) <= kept < total  # every row the writer took is on disk; the run was cut short
    assert not out.exists()

    written.unlink()
    again = launch(*command, log=tmp_path / "again.log", hooks=[("log_written_rows", str(written))])
    assert again.wait() == 0, again.output()
    assert rows_logged(written) == total - kept  # only the rest was scored
    table = pq.read_table(out)
    names = table.column("image").to_pylist()
    assert len(names) == total and len(set(names)) == total
    assert table.column("error").null_count == total


@pytest.mark.parametrize("signum", SIGNALS, ids=[s.name for s in SIGNALS])
def test_score_stopped_while_loading_the_model_says_nothing_was_scored_and_the_rerun_scores_all(
    launch, inputs, tmp_path, signum
):
    out, loading = tmp_path / "scores.parquet", tmp_path / "loading"
    command = ["score", str(inputs["photos"]), "--out", out, "--model", inputs["model"], "--workers", "2", "-q"]
    run = launch(*command, log=tmp_path / "stopped.log", hooks=[("slow_model_loading", str(loading))])
    _wait_for(loading.exists, run, "the model loading")
    run.signal(signum, group=True)
    assert run.wait() == 128 + signum
    _assert_one_line(run, f"interrupted by {signum.name} before any image was scored; run the same command")
    again = launch(*command, log=tmp_path / "again.log")
    assert again.wait() == 0, again.output()
    assert pq.read_metadata(out).num_rows == N_FILES


@pytest.mark.parametrize(("signum", "target"), MATRIX)
def test_train_keeps_its_checkpoint_and_the_rerun_resumes_from_it(launch, inputs, tmp_path, signum, target):
    data = _train_data(inputs)
    out = tmp_path / "run"
    command = ["train", "--datasets", "synth", "--data-dir", data, "--model", inputs["model"], "--out", out,
               "--batch-size", "2", "--max-steps", "4", "--save-every", "2", "--workers", "1", "--no-eval",
               "--lr", "1e-3", "-q"]  # fmt: skip
    run = launch(*command, log=tmp_path / "stopped.log", hooks=[("slow_training", 0.25)])
    directory = RunDirectory(out)
    _wait_for(lambda: directory.latest_checkpoint() is not None, run, "a checkpoint")
    run.signal(signum, group=target == "group")
    assert run.wait() == 128 + signum
    saved = directory.latest_checkpoint()
    step = int(saved.name.split("-")[1])
    _assert_one_line(run, f"interrupted by {signum.name}; the last checkpoint is {saved} (step {step})")
    assert step < 4 and not (out / "iqa.json").exists()
    if target == "main":
        return  # the same state as after a stop of the group, whose resumption is checked (seconds each)
    again = launch(*command[:-1], log=tmp_path / "again.log")
    assert again.wait() == 0, again.output()
    assert f"4 steps (resumed at step {step})" in again.output()


_prepared: dict[str, Path] = {}


def _train_data(inputs) -> Path:
    if "data" not in _prepared:
        _prepared["data"] = prepare_synthetic(inputs["root"], "synth", 24, size=(40, 32))
    return _prepared["data"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(("signum", "target"), MATRIX)
def test_serve_drains_and_exits_cleanly_with_its_workers(launch, inputs, tmp_path, signum, target):
    port = _free_port()
    command = ["serve", "--model", inputs["model"], "--device", "cpu", "--port", port]
    run = launch(*command, log=tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}/health"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    _wait_for(healthy, run, "a healthy server", timeout=180)
    run.signal(signum, group=target == "group")
    assert run.wait(60) == 0
    text = run.output()
    assert "Traceback" not in text and "error" not in text.lower(), text[-3000:]
    deadline = time.monotonic() + 10  # no worker outlives the server (multiprocessing's tracker ends just after)
    while _group_alive(run.pid):
        assert time.monotonic() < deadline, "a process of the server's group is still running"
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_torchrun_ranks_save_their_rows_when_torchrun_is_stopped(inputs, tmp_path):
    """torchrun starts each rank in a session of its own and hands a stop it gets (SIGTERM here) to every rank; each
    rank saves its rows and exits 143 without a traceback (torchrun prints its own), and a rerun does the rest."""
    from tests.test_score_pipeline import run as fake_run

    out = tmp_path / "scores.parquet"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "0"]
    command = [*launcher, "-m", "tests.test_score_pipeline", "run", str(inputs["photos"]), str(out), "--delay", "0.2"]
    proc = subprocess.Popen(
        [sys.executable, *command],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (sidecar_path(out) / "manifest.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        time.sleep(2)  # batches of 2 in 0.2 s each, on both ranks
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=90)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    ranks = [line for line in output.splitlines() if "exitcode" in line]
    assert "DataLoader worker" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert "ScoreInterrupted" not in output and not ranks, output[-3000:]  # no rank failed: each ended on its own
    saved = _saved_rows(out)
    assert 4 <= saved < N_FILES, output[-3000:]
    summary = fake_run(inputs["photos"], out)
    assert summary.resumed == saved and summary.processed == N_FILES - saved and summary.total == N_FILES


_CUT_HANDSHAKE = """
import os, socket, sys, time
from multiprocessing import resource_sharer

if sys.argv[1] == "worker":
    from iqa_cli.interrupts import leave_to_main_process

    leave_to_main_process()
r, w = os.pipe()
resource_sharer.DupFd(r)  # the sharing thread a worker starts to hand a batch's descriptors to the main process
peer = socket.socket(socket.AF_UNIX)
peer.connect(resource_sharer._resource_sharer._address)
peer.recv(4096)  # the challenge; the main process stops before answering: the thread's handshake ends in EOFError
peer.close()
time.sleep(0.5)
sys.excepthook(EOFError, EOFError("not from a connection"), None)
"""


@pytest.mark.parametrize("process", ["worker", "plain"])
def test_a_worker_says_nothing_when_the_stopping_main_process_cuts_its_descriptor_handshake(process):
    """What made a group stop print a traceback under load: the main process quit half way through fetching a
    batch's file descriptors, and the worker's resource_sharer thread reported the EOFError. A worker drops it; any
    other EOFError, and any process that is no worker, still reports."""
    result = subprocess.run([sys.executable, "-c", _CUT_HANDSHAKE, process], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "EOFError: not from a connection" in result.stderr
    assert ("resource_sharer.py" in result.stderr) == (process == "plain"), result.stderr
