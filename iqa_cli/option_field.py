"""A config dataclass field that is also a command-line flag: its help, default, metavar and panel are declared
once, on the field (`iqa_cli.cli_options` builds the flag from it). Imports nothing heavy."""

from __future__ import annotations

import dataclasses
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    metavar: str | None = None,
    control: bool = False,
    switch: str | None = None,
    required: bool = False,
    alias: str | None = None,
    envvar: str | None = None,
    completion: str | None = None,
    panel: str | None = None,
    argument: bool = False,
    raw: bool = False,
    cli: bool = True,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A `dataclasses.field` with the flag's declaration in its metadata.

    Args:
        help: the flag's help text.
        flag: the option name when it is not the field name (`lora.r` is `--lora-r`).
        control: `iqa train`: may change when a run resumes (how it runs, not what it trains).
        switch: the flag's spelling when it is not `--name` (`--from`; a boolean's `--on/--off`).
        required: the command line must give it.
        alias: another spelling (`-o`; serve's `--device` for `--devices`).
        envvar: an environment variable that gives the value when the flag is absent (a secret kept off `ps`).
        completion: `iqa_cli.completion`'s completer of its values.
        panel: the help section it is listed in (default: its config's `panel`).
        argument: a positional argument (`iqa score PATH...`) rather than an option.
        raw: the flag's text as typed (the config reads it itself, e.g. a trailing `/`).
        cli: False for a field that is no flag (set by the library, or by another option).
    """
    metadata = {
        "flag": flag, "control": control, "help": help, "metavar": metavar, "switch": switch, "required": required,
        "alias": alias, "envvar": envvar, "completion": completion, "panel": panel, "argument": argument, "raw": raw,
        "cli": cli,
    }  # fmt: skip
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)
