"""Values that shell completion offers (`autocompletion=` in cli.py), and `--install-completion [SHELL]`.

Each list is read from the module that validates the option, imported only when the shell asks for it,
so `iqa --help` stays light and a new value completes without touching this file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from iqa_cli.errors import UserError

PROG, COMPLETE_VAR = "iqa", "_IQA_COMPLETE"  # fixed, so `python -m iqa_cli` and the script complete the same way
SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")
_DETECT = "detect"  # --install-completion with no shell named: the one this process runs under


def with_optional_shell(args: list[str]) -> list[str]:
    """`--install-completion` / `--show-completion` with no shell after them: the current one. (Typer's options
    take no optional value; its own --install-completion took none and installed the detected shell's.)"""
    args = list(args)
    for i, arg in enumerate(args):
        if arg in ("--install-completion", "--show-completion") and (i + 1 == len(args) or args[i + 1][:1] == "-"):
            args.insert(i + 1, _DETECT)
    return args


def _shell(value: str) -> str | None:
    """The shell named after --install-completion/--show-completion (None: this one, as detected)."""
    if value == _DETECT:
        return None
    if value not in SHELLS:
        raise UserError(f"unknown shell {value!r}: use one of {', '.join(SHELLS)} (or none: the current one)")
    return value


def install_callback(value: str | None) -> None:
    """`--install-completion [SHELL]`: installs that shell's completion (Typer's installer), then exits."""
    if value is None:
        return
    import typer
    from typer.completion import install

    shell, path = install(shell=_shell(value), prog_name=PROG, complete_var=COMPLETE_VAR)
    print(f"{shell} completion installed in {path}; open a new shell to use it")
    raise typer.Exit()


def show_callback(value: str | None) -> None:
    """`--show-completion [SHELL]`: prints that shell's completion script, then exits."""
    if value is None:
        return
    import typer
    from typer._completion_shared import _get_shell_name, get_completion_script

    shell = _shell(value) or _get_shell_name() or "bash"
    print(get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell))
    raise typer.Exit()


def answer_the_shell() -> None:
    """Registers Typer's completion classes, which answer the shell's `_IQA_COMPLETE` requests (the app is built
    with add_completion=False, which leaves them out)."""
    from typer.completion import completion_init

    completion_init()


def _values_of(module: str, name: str) -> Callable[[str], list[str]]:
    """A completer offering `module.name`'s values that start with what was typed."""

    def complete(incomplete: str) -> list[str]:
        return [value for value in getattr(importlib.import_module(module), name) if value.startswith(incomplete)]

    return complete


densities = _values_of("iqa_cli.labels", "DENSITIES")
label_rules = _values_of("iqa_cli.labels", "LABEL_RULES")
soft_label_kinds = _values_of("iqa_cli.prepare_config", "SOFT_LABELS")
tasks = _values_of("iqa_cli.tasks", "TASKS")
methods = _values_of("iqa_cli.training.objectives", "METHODS")
layouts = _values_of("iqa_cli.training.config", "LAYOUTS")
strategies = _values_of("iqa_cli.training.config", "STRATEGIES")
dtypes = _values_of("iqa_cli.model_options", "DTYPES")
quantize_modes = _values_of("iqa_cli.model_options", "QUANTIZE_MODES")
reasoning_presets = _values_of("iqa_cli.reasoning", "PRESET_NAMES")
formats = _values_of("iqa_cli.scoring.output", "FORMATS")
splits = _values_of("iqa_cli.evaluate", "SPLITS")
prediction_columns = _values_of("iqa_cli.evaluate", "PREDICTION_COLUMNS")


def dataset_presets(incomplete: str) -> list[tuple[str, str]]:
    """`iqa prepare DATASET`: the presets, with their titles as descriptions (zsh and fish show them)."""
    from iqa_cli.datasets import DATASETS

    return [(name, spec.title) for name, spec in DATASETS.items() if name.startswith(incomplete)]


def devices(incomplete: str) -> list[str]:
    """auto, cpu, and the CUDA devices this machine has (a CUDA name elsewhere is an error)."""
    import torch

    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    return [name for name in names if name.startswith(incomplete)]
