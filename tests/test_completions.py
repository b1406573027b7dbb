"""Shell completions: the committed scripts are current, and the protocol they call answers."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "completions"))
import generate


@pytest.mark.parametrize("shell", sorted(generate.FILES))
def test_committed_completion_scripts_are_current(shell):
    committed = (REPO_ROOT / "completions" / generate.FILES[shell]).read_text()
    assert committed == generate.completion_script(shell), "run `python completions/generate.py` and commit"


def _complete(shell: str, words: str) -> str:
    env = {**os.environ, "_IQA_COMPLETE": f"complete_{shell}"}
    if shell == "bash":
        env |= {"COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
    else:
        env |= {"_TYPER_COMPLETE_ARGS": words}
        if shell == "fish":
            env["_TYPER_COMPLETE_FISH_ACTION"] = "get-args"
    result = subprocess.run(
        [sys.executable, "-m", "iqa_cli"], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_protocol_lists_subcommands(shell):
    out = _complete(shell, "iqa ")
    for command in ("prepare", "train", "score", "eval"):
        assert command in out, f"{shell} completion of `iqa ` lacks {command}: {out!r}"


def test_completion_protocol_completes_options():
    out = _complete("bash", "iqa score --ou")
    assert "--out" in out.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_bash_script_registers_the_completion_function():
    script = REPO_ROOT / "completions" / generate.FILES["bash"]
    result = subprocess.run(
        ["bash", "-c", f"source '{script}' && complete -p iqa"], capture_output=True, text=True, check=True
    )
    assert "_iqa_completion" in result.stdout
