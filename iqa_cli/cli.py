"""The `iqa` command line: parses arguments, calls library functions, prints with rich.

No logic lives here. Heavy libraries (torch, transformers) are imported inside the commands so that
`iqa --help` and shell completion stay fast.
"""

import sys

import typer
from rich.console import Console

from iqa_cli import __version__
from iqa_cli.errors import UserError

app = typer.Typer(
    name="iqa",
    help="Score image quality with multimodal LLMs (DeQA-Score, Q-Align, Q-Scorer).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


def _version_callback(value: bool) -> None:
    if value:
        out_console.print(f"iqa {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version_callback, is_eager=True
    ),
) -> None:
    """Score image quality with multimodal LLMs (DeQA-Score, Q-Align, Q-Scorer)."""


# --- prepare -------------------------------------------------------------------------------------
# (owned by the labels/prepare work; see iqa_cli/prepare.py)


# --- eval ----------------------------------------------------------------------------------------
# (owned by the metrics/eval work; see iqa_cli/evaluate.py)


# --- score ---------------------------------------------------------------------------------------
@app.command()
def score() -> None:
    """Score images into a Parquet file (not implemented yet)."""
    raise UserError("`iqa score` is not implemented yet")


# --- train ---------------------------------------------------------------------------------------
@app.command()
def train() -> None:
    """Fine-tune a multimodal LLM on prepared datasets (not implemented yet)."""
    raise UserError("`iqa train` is not implemented yet")


def main() -> None:
    """Console-script entry point: user mistakes become one line on stderr and exit code 2."""
    try:
        app()
    except UserError as exc:
        message = " ".join(str(exc).split())
        err_console.print(f"error: {message}", markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)
