"""The console script itself: version, help, and the one-line error contract."""

from iqa_cli import __version__
from tests.conftest import run_iqa


def test_version_prints_package_version():
    result = run_iqa("--version")
    assert result.returncode == 0
    assert result.stdout.splitlines()[0] == f"iqa {__version__}"  # then torch, transformers, device: test_help.py


def test_help_lists_every_subcommand():
    result = run_iqa("--help")
    assert result.returncode == 0
    for command in ("prepare", "train", "score", "eval"):
        assert command in result.stdout
