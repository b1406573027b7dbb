"""The run lock: one `iqa score`/`iqa train` per output, across processes, with stale locks taken over."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iqa_cli import run_lock
from iqa_cli.errors import UserError
from iqa_cli.run_lock import LOCK_NAME, RunLock, hold
from tests.conftest import REPO_ROOT

HOLDER = """
import os, sys, time
from pathlib import Path
from iqa_cli.run_lock import RunLock
lock = RunLock(Path(sys.argv[1]), "iqa test")
assert lock.try_acquire() is None
if sys.argv[2] == "fork":  # a child that outlives us, as a DataLoader worker may for a few seconds
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
print("locked", flush=True)
if sys.argv[2] in ("stdin", "fork"):
    sys.stdin.readline()
else:
    time.sleep(float(sys.argv[2]))
lock.release()
"""


def _holder(path: Path, until: str = "stdin") -> subprocess.Popen:
    """Another process that takes the lock at `path` and keeps it until a line on stdin (or `until` seconds)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), until],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline().strip()
    if until == "fork":
        process.child = int(line)
        line = process.stdout.readline().strip()
    assert line == "locked"
    return process


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_process_is_refused_with_the_holder_named(tmp_path):
    path = tmp_path / "run" / LOCK_NAME
    holder = _holder(path)
    try:
        info = json.loads(path.read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        assert info["command"] == "iqa test" and "T" in info["started"]

        mine = RunLock(path, "iqa score")
        seen = mine.try_acquire()
        assert seen is not None and seen.pid == holder.pid and mine.fd is None
        with pytest.raises(UserError) as caught, hold(path, command="iqa score", target="--out x.parquet"):
            raise AssertionError("the block must not run while another process holds the lock")
        message = str(caught.value)
        assert "\n" not in message and message.startswith("--out x.parquet is in use by another iqa test run")
        assert f"pid {holder.pid} on host {socket.gethostname()}, since " in message and "--wait" in message
        assert json.loads(path.read_text())["pid"] == holder.pid  # the refused run left the holder's file alone
    finally:
        holder.communicate("go\n", timeout=30)
    assert holder.returncode == 0 and not path.exists() and not path.parent.exists()  # it made the folder
    with hold(path, command="iqa score", target="--out x.parquet"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


RACER = """
import sys, time
from pathlib import Path
from iqa_cli.run_lock import RunLock
lock = RunLock(Path(sys.argv[1]), "iqa test")
while time.time() < float(sys.argv[2]):  # start together
    pass
holder = lock.try_acquire()
print("won" if holder is None else f"lost to {holder.pid}", flush=True)
time.sleep(1.0)
lock.release()
"""


def test_runs_started_at_the_same_moment_get_exactly_one_winner(tmp_path):
    path = tmp_path / "sidecar" / LOCK_NAME
    start = time.time() + 1.5
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(path), str(start)], cwd=REPO_ROOT, stdout=subprocess.PIPE)
        for _ in range(4)
    ]
    lines = [racer.communicate(timeout=60)[0].decode().strip() for racer in racers]
    winners = [racer.pid for racer, line in zip(racers, lines, strict=True) if line == "won"]
    assert len(winners) == 1, lines
    assert all(line in ("won", f"lost to {winners[0]}") for line in lines), lines
    assert not path.exists()  # (the folder may stay: a loser can make it and the winner did not)


def test_wait_says_so_once_and_runs_when_the_other_run_ends(tmp_path):
    path = tmp_path / LOCK_NAME
    holder = _holder(path, until="1.5")
    lines: list[str] = []
    start = time.monotonic()
    with hold(path, command="iqa score", target="--out x.parquet", wait=True, say=lines.append, poll=0.05):
        waited = time.monotonic() - start
        assert holder.poll() is not None or holder.wait(timeout=10) == 0
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert waited > 0.5
    assert len(lines) == 1 and lines[0].startswith("waiting for another iqa test run (pid ")
    assert lines[0].endswith("to finish with --out x.parquet")
    assert not path.exists() and tmp_path.is_dir()  # a folder it did not create stays


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    path = tmp_path / "sidecar" / LOCK_NAME
    path.parent.mkdir()
    dead = _dead_pid()
    stale = {"host": socket.gethostname(), "pid": dead, "started": "2026-01-01T00:00:00+00:00", "command": "iqa score"}
    path.write_text(json.dumps(stale))
    lock = RunLock(path, "iqa score", remove_folder=True)
    assert lock.try_acquire() is None
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.parent.exists()  # remove_folder: the empty sidecar goes too


def test_a_run_killed_with_9_leaves_no_lock_behind_even_while_its_forked_children_run(tmp_path):
    path = tmp_path / LOCK_NAME
    holder = _holder(path, until="fork")
    try:
        assert RunLock(path, "iqa score").try_acquire() is not None
        holder.kill()
        holder.wait(timeout=30)
        os.kill(holder.child, 0)  # the child still runs
        lock = RunLock(path, "iqa score")
        assert lock.try_acquire() is None  # at once: the child closed its copy of the lock file when forked
        lock.release()
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder.child, signal.SIGKILL)


def test_a_lock_file_removed_by_its_holder_while_we_opened_it_is_not_trusted(tmp_path, monkeypatch):
    """The holder unlinks the file before unlocking; whoever locked the unlinked file must start again."""
    path = tmp_path / LOCK_NAME
    first = RunLock(path, "iqa score")
    assert first.try_acquire() is None
    old = os.open(path, os.O_RDWR)  # opened before the holder let go, as a racing second run would
    first.release()
    second = RunLock(path, "iqa score")
    opens = iter([old])
    real_open = second._open
    monkeypatch.setattr(second, "_open", lambda: next(opens, None) or real_open())
    assert second.try_acquire() is None
    assert second.fd != old and path.exists()
    assert os.fstat(second.fd).st_ino == os.stat(path).st_ino
    third = RunLock(path, "iqa score")
    assert third.try_acquire() is not None  # the lock at `path` is really held
    second.release()


def test_the_holder_description_says_what_cannot_be_checked(monkeypatch):
    here = socket.gethostname()
    assert "another machine" in run_lock.Holder(f"{here}-elsewhere", 123, "2026-01-01T00:00:00+00:00").describe()
    gone = run_lock.Holder(here, _dead_pid(), "2026-01-01T00:00:00+00:00").describe()
    assert "has ended but a process it started still holds the lock" in gone
    alive = run_lock.Holder(here, os.getpid(), "2026-01-01T00:00:00+00:00").describe()
    assert alive == f"pid {os.getpid()} on host {here}, since 2026-01-01 00:00:00 UTC"


def test_a_lock_folder_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "s.parquet.parts").write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot create the lock file .*s\.parquet\.parts is not a folder"):
        RunLock(tmp_path / "s.parquet.parts" / LOCK_NAME, "iqa score").try_acquire()
    assert run_lock.Holder().describe() == "its lock file does not say which"  # a file caught mid-write


def test_under_torchrun_only_rank_0_locks_and_the_others_follow_it(tmp_path, monkeypatch):
    """A rank > 0 creates no lock file and does what rank 0 broadcasts: run, refuse, or keep waiting."""
    from iqa_cli import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    path = tmp_path / LOCK_NAME
    for answers, outcome in [
        ([("ok", "")], "ran"),
        ([("held", "iqa score run (pid 1 on host h, since x)")], "refused"),
        ([("held", "iqa score run (pid 1)"), ("held", "iqa score run (pid 1)"), ("ok", "")], "ran"),
    ]:
        received = iter(answers)
        monkeypatch.setattr(distributed, "broadcast_object", lambda obj, src=0, it=received: next(it))
        wait = len(answers) > 1
        try:
            with hold(path, command="iqa score", target="--out x", wait=wait, poll=0):
                result = "ran"
        except UserError as exc:
            result = "refused"
            assert "pid 1 on host h" in str(exc)
        assert result == outcome and not path.exists()
        assert next(received, None) is None  # it followed every answer rank 0 gave


# --- `iqa train`: the run directory is locked before anything is loaded ---------------------------------


def test_train_refuses_a_run_directory_in_use_and_trains_after_waiting_with_wait(tmp_path, iqa, monkeypatch):
    """The real command line in this process (another process holds the lock): refused in one line before
    anything is written; with --wait it says so once, does no work while it waits, then trains."""
    import types

    from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint
    from iqa_cli.synthetic import make_synthetic_iqa

    csv_path = make_synthetic_iqa(tmp_path / "src", 8, size=(40, 32))
    data = tmp_path / "data"
    code, _, err = iqa("prepare", "custom", "--csv", csv_path, "--images", csv_path.parent / "images",
                       "--image-col", "image", "--mos-col", "mos", "--std-col", "std", "--name", "synth",
                       "--data-dir", data, "--test-frac", "0.25")  # fmt: skip
    assert code == 0, err
    model = write_tiny_checkpoint(tmp_path / "model", image_size=28)
    out = tmp_path / "run"
    path = out / LOCK_NAME
    args = ["train", "--datasets", "synth", "--data-dir", data, "--model", model, "--out", out]
    args += ["--max-steps", "1", "--batch-size", "2", "--no-eval", "--workers", "0", "--device", "cpu"]
    holder = _holder(path)
    try:
        code, _, err = iqa(*args)
    finally:
        holder.communicate("go\n", timeout=30)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: --out {out} is in use by another iqa test run (pid {holder.pid} ")
    assert not out.exists()  # the holder made the folder and removed it; the refused run wrote nothing

    holder = _holder(path)
    seen: list[bool] = []

    def first_poll(seconds: float) -> None:  # the waiting run's first pause: let the holder go now
        if not seen:
            seen.append((out / "train_config.json").exists())
            holder.communicate("go\n", timeout=30)
        time.sleep(seconds)

    monkeypatch.setattr(run_lock, "time", types.SimpleNamespace(sleep=first_poll))
    try:
        code, _, err = iqa(*args, "--wait")
    finally:
        holder.kill()
    assert code == 0, err
    assert seen == [False]  # it waited, before any work
    assert err.count("waiting for another iqa test run") == 1
    assert "trained deqa: 1 steps" in err and (out / "iqa.json").is_file()
    assert not path.exists()
