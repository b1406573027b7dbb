"""The console script itself: version, help, and the one-line error contract."""

import subprocess
import sys
import textwrap

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
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("exit", "frozen"))]
    assert lines == ["exit code: 0", "exit code: 2", "frozen before exit: False", "frozen at exit: True"]


def test_a_process_in_a_distributed_group_keeps_the_final_garbage_collection():
    """`distributed.init` undoes the exit-time freeze: objects holding a gloo group in cycles (FSDP2 state)
    must be freed and the group's threads joined before shutdown, or a rank can abort at exit."""
    code = """
        import atexit, gc, sys
        atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0))
        from iqa_cli.cli import main
        from iqa_cli import process
        sys.argv = ["iqa", "--version"]
        try:
            main()
        except SystemExit:
            pass
        process.keep_final_collection()  # what distributed.init calls after joining a group
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "frozen at exit: False"
    source = (REPO_ROOT / "iqa_cli" / "distributed.py").read_text()
    init_body = source.split("def init(", 1)[1].split("\ndef ", 1)[0]
    assert "process.keep_final_collection()" in init_body
