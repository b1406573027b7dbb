"""The console script itself: version, help, and the one-line error contract."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from iqa_cli import __version__
from tests.conftest import REPO_ROOT, run_iqa


def test_version_prints_package_version():
    result = run_iqa("--version")
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == f"iqa {__version__}"  # then torch, transformers, device: test_help.py


def test_help_lists_every_subcommand():
    result = run_iqa("--help")
    assert result.returncode == 0
    for command in ("prepare", "train", "score", "eval"):
        assert command in result.stdout


def _python(code: str) -> subprocess.CompletedProcess:
    """`code` (dedented) in a fresh interpreter from the repository root: what a new process imports and does."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )


def test_the_final_garbage_collection_is_skipped_only_when_the_process_ends():
    """main() freezes the heap at exit (the shutdown collection costs ~1 s after `iqa score`), not before:
    a process that calls main() twice keeps collecting garbage, and an error still exits with code 2."""
    code = """
        import atexit, gc, sys
        atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0))  # runs after main()'s
        from iqa_cli.cli import main
        for args in (["--version"], ["eval", "missing.parquet"]):
            sys.argv = ["iqa", *args]
            try:
                main()
            except SystemExit as exc:
                print("exit code:", exc.code or 0)
        print("frozen before exit:", gc.get_freeze_count() > 0)
        sys.exit(2)
    """
    result = _python(code)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("exit", "frozen"))]
    assert lines == ["exit code: 0", "exit code: 2", "frozen before exit: False", "frozen at exit: True"]


def test_a_process_in_a_distributed_group_keeps_the_final_garbage_collection():
    """Two ranks that run main() and then join a gloo group through `distributed.init` collect garbage at exit:
    objects holding the group in cycles (FSDP2 state) must be freed and its threads joined before shutdown, or
    a rank can abort at exit."""
    code = """
        import atexit, gc, sys
        atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))
        from iqa_cli.cli import main
        sys.argv = ["iqa", "--version"]
        try:
            main()
        except SystemExit:
            pass
        import torch
        from iqa_cli import distributed
        distributed.init(torch.device("cpu"))
        print("joined:", distributed.rank(), "of", distributed.world_size(), flush=True)
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    torchrun = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            cwd=REPO_ROOT,
            env={**os.environ, **torchrun, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    for rank, (process, (stdout, stderr)) in enumerate(zip(ranks, outputs, strict=True)):
        assert process.returncode == 0, stderr
        assert f"joined: {rank} of 2" in stdout, stdout
        assert stdout.splitlines()[-1] == "frozen at exit: False", stdout


def test_the_public_api_is_one_import_and_loads_torch_only_when_used():
    code = (
        "import sys, iqa_cli\n"
        "print('torch' in sys.modules)\n"
        "from iqa_cli import Scorer, ScoreConfig, score_images, create_metric\n"
        "from iqa_cli.scoring.scorer import Scorer as Real\n"
        "print(Scorer is Real, callable(score_images), callable(create_metric), 'torch' in sys.modules)\n"
        "print(sorted(iqa_cli.__all__))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "False" and lines[1] == "True True True True"
    assert "Scorer" in lines[2] and "create_metric" in lines[2]
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        import iqa_cli

        iqa_cli.Nope  # noqa: B018


def test_scoring_imports_no_scipy():
    """scipy costs 0.13 s of every `iqa score` start: the scoring path (the scorer reads the level names from
    iqa_cli.labels) must not import it; prepare's Gaussian labels import it when they compute."""
    code = (
        "import sys\n"
        "import iqa_cli.scoring.driver, iqa_cli.scoring.scorer, iqa_cli.cli\n"
        "print('scipy' in sys.modules)\n"
        "from iqa_cli.labels import gaussian_level_probs\n"
        "gaussian_level_probs([3.0], [0.5], 5)\n"
        "print('scipy' in sys.modules)\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
