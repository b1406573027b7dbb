"""Shared test helpers: seeding, the CLI in a subprocess, the data fixtures in tests/fixtures/, the `gpu` marker
(and the CPU for every test without it)."""

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

# Nothing in the tests may reach the network: an uncached repo id would otherwise cost huggingface_hub's
# retries (~23 s here) before the offline error the test expects. Set before huggingface_hub is imported;
# subprocesses inherit it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _quiet_torchao_notice() -> None:
    """What `iqa` does before any command, for tests that call the library first (torchao's import notice would
    otherwise land in the stderr of whichever in-process command a test runs next, whatever the test order)."""
    from iqa_cli.process import quiet_torchao_notice

    quiet_torchao_notice()


_quiet_torchao_notice()

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # origin and license: fixtures/README.md
TOKENIZER_FIXTURE = FIXTURES / "mplug-owl2-tokenizer"
KEYS_FIXTURE = FIXTURES / "mplug-owl2-7b-keys.json"


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests cleanly where no CUDA device is present."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_CPU_ONLY = pytest.StashKey[pytest.MonkeyPatch]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Tests not marked `gpu` run on the CPU whatever the machine has. On a GPU machine `--device auto` would
    pick cuda:0 and bf16 autocast, where bit-exact checks cannot hold, and a 2-rank torchrun would put rank 1 on
    a cuda:1 that a one-GPU machine lacks. Subprocesses (the CLI, torchrun) see no GPU through
    CUDA_VISIBLE_DEVICES, this process through torch.cuda's answers; set before the test's fixtures (module
    fixtures included) are made, undone after its teardown."""
    if item.get_closest_marker("gpu") is not None:
        return
    import torch

    patch = pytest.MonkeyPatch()
    patch.setenv("CUDA_VISIBLE_DEVICES", "")
    patch.setattr(torch.cuda, "is_available", lambda: False)
    patch.setattr(torch.cuda, "device_count", lambda: 0)
    item.stash[_CPU_ONLY] = patch


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    patch = item.stash.get(_CPU_ONLY, None)
    if patch is not None:
        patch.undo()


@pytest.fixture
def seeded() -> int:
    """Seeds python, numpy and torch; returns the seed."""
    seed = 1234
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass
    return seed


@pytest.fixture
def tokenizer_fixture() -> Path:
    """The real LLaMA-2 tokenizer files and the released preprocessor config."""
    return TOKENIZER_FIXTURE


# For long tiny-model runs: one OpenMP thread. The 64-wide test models gain nothing from intra-op threads, and
# on a loaded 2-core machine two spinning threads made training 4x slower. Not the default: runs compared
# bit for bit with runs made elsewhere in a test must use the same thread count.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    """ONE_THREAD for this process: torch's intra-op threads set to 1 for the test, then restored."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_iqa(
    *args: str,
    cwd: Path | None = None,
    env: dict | None = None,
    timeout: float = 600,
    progress: Callable[[], str] | None = None,
):
    """Runs the real `iqa` console script in a subprocess; returns the CompletedProcess.

    On a timeout the test fails with what the run had done: `progress()` (e.g. `last_train_record`) and the end
    of its stderr so far, instead of a bare TimeoutExpired. Long training runs pass `env=ONE_THREAD`.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        return subprocess.run(
            [sys.executable, "-m", "iqa_cli", *args],
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        reached = progress() if progress is not None else "(no progress report)"
        pytest.fail(
            f"iqa {' '.join(args[:1])} did not finish in {timeout:.0f} s; reached: {reached}\n"
            f"stderr so far (last 3000 characters):\n{stderr[-3000:]}",
            pytrace=False,
        )


def fixed_unit_size(patch: pytest.MonkeyPatch, per_unit: int) -> None:
    """Folders, files and --from lists cut into units of `per_unit` images (the run's own size depends on the image
    count: `iqa_cli.sources.files.files_per_unit`), for tests about units: set in every process of a run, since a
    resume matches units by number."""
    patch.setattr("iqa_cli.sources.files.files_per_unit", lambda n: per_unit)


def kill_when(process: subprocess.Popen, condition: Callable[[], bool], missing: str, timeout: float = 120) -> None:
    """A kill -9 mid-run: waits while `process` runs until `condition()` holds (failing with `missing` after
    `timeout` s, or with the process's output if it exits first), then SIGKILLs it and waits for it to go."""
    try:
        deadline = time.monotonic() + timeout
        while not condition():
            assert process.poll() is None, process.communicate()[0].decode()
            assert time.monotonic() < deadline, missing
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()


def last_train_record(run: Path) -> str:
    """Where a training run is, for timeout reports: the last record of its train_log.jsonl (one per step)."""
    log = run / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return lines[-1][:300] if lines else f"no step logged yet in {log}"


@pytest.fixture
def iqa(monkeypatch, capsys):
    """`iqa(*args) -> (exit code, stdout, stderr)`: the console-script entry point `iqa_cli.cli.main` run in
    this process (a second faster per call than `run_iqa`'s subprocess; same parsing and error handling)."""
    from iqa_cli import cli

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["iqa", *map(str, args)])
        code = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code or 0
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
