"""Typer parameters generated from the options' one declaration (`iqa_cli.model_options`), so a command lists a
model option, or a family's own option, without spelling it out: `@with_model_options()` adds one flag per option to
the command and hands the command a `ModelSpec` instead."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import typer

from iqa_cli import completion
from iqa_cli.model_options import ModelOption, ModelSpec, options

MODEL_PANEL = "Model"


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
