"""Typer parameters generated from each option's one declaration, so no command spells an option out twice:
`@with_model_options()` adds the model options (`iqa_cli.model_options`, a family's own included) and hands the
command a `ModelSpec`; `@with_config_options(TrainConfig)` adds one flag per field of a nested config dataclass.

Also how help reads (`HelpCommand`, `flowed`): options in panels, usage and help without Python type names, help
text wrapped to the terminal as prose, every `[default: ...]` shown as written (not taken for rich markup).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from iqa_cli import completion
from iqa_cli.errors import UserError
from iqa_cli.model_options import ModelOption, ModelSpec, options

MODEL_PANEL = "Model"
HELP_PANEL = "Help"


def flowed(text: str | None) -> str:
    """Help text as rich help shows it well: each paragraph one line (rich keeps single line breaks, which would
    break sentences at the source's width), a `\\b` paragraph kept line by line (lists, examples), and square
    brackets escaped so `[default: x]` is shown, not taken for a rich style."""
    from rich.markup import escape

    paragraphs = []
    for paragraph in inspect.cleandoc(text or "").split("\n\n"):
        if paragraph.startswith("\b"):
            paragraphs.append(paragraph.removeprefix("\b").strip("\n"))
        else:
            paragraphs.append(" ".join(line.strip() for line in paragraph.splitlines()))
    return escape("\n\n".join(paragraphs))


def _no_type(ctx: Any) -> None:
    return None


def _plain_usage(pieces: list[str]) -> list[str]:
    """`{FILE}` (Typer's mark of a required argument) as `FILE`."""
    return [re.sub(r"^\{(.*)\}(\.\.\.)?$", r"\1\2", piece) for piece in pieces]


def _without_type_names(params: list[Any]) -> list[Any]:
    """Flags and positional arguments show no `<bool>` / `<list[str]>` column: a flag takes no value, and an
    argument's name (PATH, FILE) already says what goes there."""
    for param in params:
        if getattr(param, "is_flag", False) or isinstance(param, TyperArgument):
            param.display_type_rich = _no_type
    return params


def flow_parameter_help(function: Callable, panels: dict[str, tuple[str, ...]] | None = None) -> None:
    """`flowed` on the help of every option and argument of a command (hand-written or generated), once; the
    parameters `panels` names are listed in those help panels."""
    panel_of = {name: panel for panel, names in (panels or {}).items() for name in names}
    for parameter in inspect.signature(function).parameters.values():
        info = parameter.default
        if not isinstance(info, (typer.models.OptionInfo, typer.models.ArgumentInfo)):
            continue
        if info.help:
            info.help = flowed(info.help)
        if parameter.name in panel_of:
            info.rich_help_panel = panel_of[parameter.name]


class HelpCommand(TyperCommand):
    """A command whose help lists its options in their panels, `--help`/`-h` last, without Python type names."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return _plain_usage(super().collect_usage_pieces(ctx))

    def get_params(self, ctx: Any) -> list[Any]:
        return _without_type_names(super().get_params(ctx))

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.rich_help_panel = HELP_PANEL
        return option


class HelpGroup(TyperGroup):
    """The root command's help, as `HelpCommand`'s."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return _plain_usage(super().collect_usage_pieces(ctx))

    def get_params(self, ctx: Any) -> list[Any]:
        return _without_type_names(super().get_params(ctx))


def _parameter(option: ModelOption, default: Any, help_text: str | None) -> inspect.Parameter:
    annotation = option.kind if default is not None else option.kind | None
    typer_option = typer.Option(
        default,
        option.flag,
        metavar=option.metavar,
        help=help_text or option.help,
        autocompletion=getattr(completion, option.completion) if option.completion else None,
        rich_help_panel=MODEL_PANEL,
        show_default=default is not None,
    )
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=typer_option, annotation=annotation)


def with_model_options(
    names: tuple[str, ...] | None = None,
    *,
    into: str = "model",
    defaults: dict[str, Any] | None = None,
    helps: dict[str, str] | None = None,
) -> Callable[[Callable], Callable]:
    """Adds the model options (`names` of the common ones, or all; every family option) to a command; their values
    reach it as one `ModelSpec` in its parameter `into`. `defaults`/`helps` say what differs for this command
    (`iqa train`'s model to fine-tune)."""
    declared = options(names)
    defaults, helps = defaults or {}, helps or {}

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        kept = [p for p in signature.parameters.values() if p.name != into]
        added = [_parameter(o, defaults.get(o.name, o.default), helps.get(o.name)) for o in declared]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {o.name: kwargs.pop(o.name) for o in declared}
            return command(**kwargs, **{into: ModelSpec.from_values(values)})

        parameters = [*kept, *added]
        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}  # what Typer reads the types from
        return wrapper

    return decorate


# --- a config's fields as flags (`iqa train`, `iqa score`) -------------------------------------------------------

# a field's annotation -> the flag's type (lists and paths are typed as text and parsed by `_parse`)
_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "Path": str, "list[str]": str, "list[int]": str,
          "int | str": str, "str | Sequence[str]": str}  # fmt: skip


def config_fields(config_cls: type) -> list[tuple[dataclasses.Field, str]]:
    """(field, panel) of every flag of a config: its own fields, then each section's (a nested dataclass), in order."""
    found = []
    for f in dataclasses.fields(config_cls):
        if not f.metadata.get("cli", True):
            continue
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            found += [
                (g, g.metadata.get("panel") or f.default_factory.panel) for g in dataclasses.fields(f.default_factory)
            ]
        else:
            found.append((f, f.metadata.get("panel") or config_cls.panel))
    return [(f, panel) for f, panel in found if f.metadata.get("cli", True)]


def _config_parameter(f: dataclasses.Field, panel: str) -> tuple[str, inspect.Parameter]:
    meta = f.metadata
    name = meta.get("flag") or f.name
    own = f.type.removesuffix(" | None")
    if meta.get("argument"):  # positional, any number (`iqa score PATH...`)
        typer_param: Any = typer.Argument(
            None, metavar=meta.get("metavar"), help=meta.get("help"), show_default=False
        )  # listed under "Arguments", as every command's
        return "arguments", inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=typer_param,
                                              annotation=list[str] | None)  # fmt: skip
    if meta.get("required"):
        default: Any = ...
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        default = ",".join(map(str, value)) if isinstance(value, list) and value else None
    else:
        default = f.default
    flags = [meta.get("switch") or "--" + name.replace("_", "-"), *([meta["alias"]] if meta.get("alias") else [])]
    # A setting on by default with one switch (`--no-x`, short enough for an 80-column help): the flag is the
    # switch, False unless given, and the setting its negation (`_parse`); its help says the default.
    turns_off = default is True and "/" not in flags[0]
    typer_param = typer.Option(
        False if turns_off else default,
        *flags,
        metavar=meta.get("metavar"),
        help=meta.get("help"),
        envvar=meta.get("envvar"),
        autocompletion=getattr(completion, meta["completion"]) if meta.get("completion") else None,
        rich_help_panel=panel,
        show_default=all(default is not v for v in (None, ..., False)) and not turns_off,
    )
    kind = _TYPES[own]
    annotation = kind | None if f.type.endswith(" | None") or default is None else kind
    parameter = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=typer_param, annotation=annotation)
    return ("str" if meta.get("raw") else "off switch" if turns_off else own), parameter


def _parse(name: str, own: str, value: Any) -> Any:
    """A flag's text as the config field's type: comma-separated lists, paths (positional arguments as given), a
    setting from its off switch."""
    if own == "off switch":
        return not value
    if value is None or own not in ("Path", "list[str]", "list[int]", "arguments"):
        return value
    if own == "arguments":
        return list(value)
    if own == "Path":
        return Path(value)
    items = [item.strip() for item in value.split(",") if item.strip()]
    if own == "list[int]":
        try:
            return [int(item) for item in items]
        except ValueError:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} expects comma-separated integers, got {value!r}") from None
    return items


def with_config_options(config_cls: type, *, into: str) -> Callable[[Callable], Callable]:
    """Adds one flag per field of a config dataclass (`iqa_cli.option_field.option` declares each: help, default,
    metavar, panel; a nested config's sections too) to a command; the parsed values reach it as a dict of option
    names in `into`."""
    fields = config_fields(config_cls)
    declared = [_config_parameter(f, panel) for f, panel in fields]
    factory_made = {f.metadata.get("flag") or f.name for f, _ in fields if f.default_factory is not dataclasses.MISSING}

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        kept = [p for p in signature.parameters.values() if p.name != into]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {p.name: _parse(p.name, own, kwargs.pop(p.name)) for own, p in declared}
            values = {k: v for k, v in values.items() if v is not None or k not in factory_made}  # their defaults
            return command(**kwargs, **{into: values})

        # the command's own arguments, the config's flags, then the command's own flags (`--json`, `--quiet`)
        own_flags = [p for p in kept if isinstance(p.default, typer.models.OptionInfo)]
        first = [p for p in kept if p not in own_flags]
        own_flags = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own_flags]
        parameters = [*first, *(p for _, p in declared), *own_flags]
        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate
