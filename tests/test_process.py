"""The `iqa` script's exit (`iqa_cli.process.run_then_exit`): the exit code, atexit handlers and buffered output of a
normal interpreter exit, without its teardown; a normal exit when a non-daemon thread still runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT, run_iqa


def _run(body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""
        import atexit, sys, threading, time
        from iqa_cli.process import run_then_exit
        atexit.register(lambda: print("atexit ran", flush=True))
    """) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False
    )


@pytest.mark.parametrize(
    ("body", "returncode", "stderr"),
    [
        ("run_then_exit(lambda: print('x' * 100000, end=''))", 0, ""),  # returned: 0, a large buffer flushed
        ("run_then_exit(lambda: sys.exit(3))", 3, ""),
        ("run_then_exit(lambda: sys.exit(None))", 0, ""),
        ("run_then_exit(lambda: sys.exit('no such file'))", 1, "no such file\n"),  # as Python reports it
    ],
)
def test_exit_code_atexit_handlers_and_buffers_as_a_normal_exit(body, returncode, stderr):
    result = _run(body)
    assert result.returncode == returncode and result.stderr == stderr
    assert result.stdout.endswith("atexit ran\n")
    if "x' * 100000" in body:
        assert result.stdout == "x" * 100000 + "atexit ran\n"


def test_a_running_non_daemon_thread_gets_the_normal_exit():
    result = _run("""
        def late():
            time.sleep(0.5)
            print("thread finished", flush=True)

        run_then_exit(lambda: threading.Thread(target=late).start())
    """)
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["thread finished", "atexit ran"]  # waited for, as Python does


def test_the_cli_keeps_its_exit_codes_and_output():
    assert run_iqa("--version").stdout.startswith("iqa ")
    result = run_iqa("eval", "missing.parquet")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "missing.parquet" in result.stderr
    assert "--fast-decode" in run_iqa("score", "--help").stdout
