"""The real `iqa` console script in a process of its own, started in a few milliseconds instead of seconds.

A launcher process imports torch and the CLI once (and runs nothing), then forks one child per command: the child
leads a new process group (so a test can signal it alone or its whole group, as a shell's job control or a
scheduler does), writes stdout and stderr to a log file, and runs `iqa_cli.cli.entry()` with the given arguments,
environment and folder, exactly as the `iqa` script does after its imports. Forking a process that never ran a
torch operation is safe (no OpenMP threads exist yet); forking the test process itself would not be.

`hooks` names functions of this module that the child runs before the command: test-only slow-downs, so that a
signal reliably arrives while work is in flight, and a log of the rows the score writer accepted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT

_LAUNCHER = r"""
import json, os, signal, sys
# what the commands import (seconds, once); nothing runs here
import torch, transformers.optimization  # noqa: F401
import iqa_cli.cli, iqa_cli.scoring.driver, iqa_cli.scoring.scorer, iqa_cli.training.run  # noqa: F401
import iqa_cli.training.session, iqa_cli.models.mplug_owl2.backbone  # noqa: F401
import tests.forked_cli as hooks

for line in sys.stdin:
    request = json.loads(line)
    if "poll" in request:
        pid, status = os.waitpid(request["poll"], os.WNOHANG)
        print(json.dumps(None if pid == 0 else os.waitstatus_to_exitcode(status)), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0), os.dup2(log, 1), os.dup2(log, 2)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.update(request["env"])
        for name, argument in request["hooks"]:
            getattr(hooks, name)(argument)
        sys.argv = ["iqa", *request["args"]]
        iqa_cli.cli.entry()
    print(pid, flush=True)
"""


@dataclass
class Run:
    """One launched command: its pid (also its process group's id) and log."""

    launcher: Launcher
    pid: int
    log: Path
    returncode: int | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.launcher.poll(self.pid)
        return self.returncode

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"iqa did not exit within {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        return self.returncode

    def signal(self, signum: int, *, group: bool) -> None:
        """`signum` to the command's main process only, or to its whole process group (its children too)."""
        (os.killpg if group else os.kill)(self.pid, signum)

    def kill(self) -> None:
        if self.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.wait(30)


class Launcher:
    """The forking launcher; one per test module (`with Launcher() as launch:`)."""

    def __init__(self, env: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE", **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _ask(self, request: dict) -> str:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the launcher ended (exit code {self.process.wait()})")
        return answer

    def __call__(self, *args: str, log: Path, cwd: Path = REPO_ROOT, env: dict | None = None, hooks=()) -> Run:
        request = {"args": [str(a) for a in args], "log": str(log), "cwd": str(cwd), "env": env or {},
                   "hooks": [list(h) for h in hooks]}  # fmt: skip
        return Run(self, int(self._ask(request)), Path(log))

    def poll(self, pid: int) -> int | None:
        return json.loads(self._ask({"poll": pid}))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- hooks: run in the child before the command ----------------------------------------------------------------


def slow_scoring(seconds: float) -> None:
    """Each model call of `iqa score` takes at least `seconds` more."""
    from iqa_cli.scoring import runner

    call = runner.BatchRunner.__call__

    def slow(self, visual):
        time.sleep(seconds)
        return call(self, visual)

    runner.BatchRunner.__call__ = slow


def log_written_rows(path: str) -> None:
    """Appends the number of rows each `UnitWriter.add` accepted to `path` (one line per batch, after the call)."""
    from iqa_cli.scoring import store

    add = store.UnitWriter.add

    def logged(self, batch, result):
        n = add(self, batch, result)
        with open(path, "a") as f:
            f.write(f"{n}\n")
        return n

    store.UnitWriter.add = logged


def slow_training(seconds: float) -> None:
    """Each training micro step takes at least `seconds` more."""
    from iqa_cli.training import loop

    step = loop._micro_step

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return step(*args, **kwargs)

    loop._micro_step = slow


def slow_model_loading(marker: str) -> None:
    """`Scorer.from_pretrained` creates the file `marker`, then waits 30 s before loading (a stop comes first)."""
    from iqa_cli.scoring.scorer import Scorer

    load = Scorer.from_pretrained.__func__

    def slow(cls, *args, **kwargs):
        Path(marker).touch()
        time.sleep(30)
        return load(cls, *args, **kwargs)

    Scorer.from_pretrained = classmethod(slow)


def rows_logged(path: Path) -> int:
    return sum(int(n) for n in path.read_text().split()) if path.exists() else 0
