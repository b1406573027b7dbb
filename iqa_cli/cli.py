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
@app.command("eval")
def eval_(
    predictions: str = typer.Argument(..., help="Predictions written by `iqa score` (Parquet; CSV/JSONL also read)."),
    gt: str | None = typer.Option(
        None, "--gt", help="Ground truth: a meta from `iqa prepare` (Parquet) or a CSV with image,mos[,std,dataset]."
    ),
    json_out: str | None = typer.Option(None, "--json", help="Also write the numbers to this JSON file."),
    plot: str | None = typer.Option(
        None, "--plot", help="Draw predicted vs human scores per dataset to this PNG (needs iqa-cli[plot])."
    ),
    split: str | None = typer.Option(
        None, "--split", help="test, train or all [default: test if the ground truth has test rows, else all]."
    ),
    column: str = typer.Option("score", "--column", help="Prediction column to evaluate: score or score_reg."),
) -> None:
    """Compare predicted scores with human opinion scores: PLCC, SRCC, KRCC, RMSE, KL/JS/W2."""
    from pathlib import Path

    from iqa_cli.evaluate import evaluate, plot_report, report_messages, report_tables, require_matplotlib

    if plot is not None:
        require_matplotlib()
    report = evaluate(Path(predictions), Path(gt) if gt else None, split=split, column=column)
    for line in report_messages(report):
        err_console.print(line, markup=False, soft_wrap=True)
    for table in report_tables(report):
        out_console.print(table)
    if json_out is not None:
        report.write_json(Path(json_out))
        err_console.print(f"wrote {json_out}", markup=False, soft_wrap=True)
    if plot is not None:
        plot_report(report, Path(plot))
        err_console.print(f"wrote {plot}", markup=False, soft_wrap=True)


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
