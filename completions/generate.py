"""Writes the shell completion scripts for `iqa` into this folder.

Run `python completions/generate.py` after changing the CLI's Typer/click version; `tests/test_completions.py`
fails while the committed scripts differ from what this prints. The scripts call back into `iqa` for the
candidates, so new commands and options complete without regenerating.
"""

from pathlib import Path

from typer._completion_shared import get_completion_script

HERE = Path(__file__).resolve().parent
PROG = "iqa"
COMPLETE_VAR = "_IQA_COMPLETE"
FILES = {"bash": "iqa.bash", "zsh": "_iqa", "fish": "iqa.fish"}


def completion_script(shell: str) -> str:
    return get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell).rstrip("\n") + "\n"


def main() -> None:
    for shell, name in FILES.items():
        (HERE / name).write_text(completion_script(shell))
        print(f"wrote completions/{name}")


if __name__ == "__main__":
    main()
