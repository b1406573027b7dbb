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
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
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
def _prepare_help() -> str:
    from iqa_cli.datasets import source_help

    return (
        "Build soft labels from a dataset's official metadata and write them to a Parquet file.\n\n"
        "Reads DATASET's metadata (--csv), normalizes MOS/std to [1, 5], builds one-hot and DeQA-Score soft "
        "labels, assigns train/test, writes <data dir>/NAME.parquet and prints the label statistics of the "
        "DeQA-Score paper's Tables 1-2. Datasets with reference images (kadid, pipal, tid2013, csiq) are split "
        "by reference image.\n\n\b\nDATASET and what --csv names:\n" + source_help()
    )


def _print_prepare_summary(summary: dict) -> None:
    from rich.table import Table

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    stats = summary["labels"]
    splits = ", ".join(f"{k} {v}" for k, v in summary["split"].items() if k != "source")
    out_console.print(
        f"{summary['dataset']}: {summary['rows']} rows ({splits}) -> {summary['out']}", markup=False, soft_wrap=True
    )
    table = Table(title=f"labels: {summary['levels']} levels, {summary['density']}", title_justify="left")
    table.add_column("recovered vs N(mos, std)")
    table.add_column("one-hot", justify="right")
    table.add_column("soft", justify="right")
    for key, label in (("l1", "L1"), ("rmse", "RMSE"), ("plcc", "PLCC"), ("srcc", "SRCC"), ("js", "JS"),
                       ("wasserstein", "Wasserstein")):  # fmt: skip
        table.add_row(label, fmt(stats["one_hot"][key]), fmt(stats["soft"][key]))
    out_console.print(table)
    alpha, beta, raw = stats["alpha"], stats["beta"], stats["raw"]
    out_console.print(
        f"raw Gaussian (before adjustment): L1 {fmt(raw['l1'])}, RMSE {fmt(raw['rmse'])}\n"
        f"alpha {fmt(alpha['mean'])} ± {fmt(alpha['std'])}, beta {fmt(beta['mean'])} ± {fmt(beta['std'])}\n"
        f"fallback (two-point) {stats['fallback']} / {stats['rows']}, clipped {stats['clipped']}",
        markup=False,
        soft_wrap=True,
    )


@app.command(help=_prepare_help())
def prepare(
    dataset: str = typer.Argument(..., help="Dataset preset (see above) or 'custom'."),
    csv: str = typer.Option(..., "--csv", help="The metadata file, or its directory (see above)."),
    images: str | None = typer.Option(
        None, "--images", help="Image root: check that every image exists (found by file name if moved)."
    ),
    out: str | None = typer.Option(None, "--out", help="Output Parquet file [default: <data dir>/NAME.parquet]."),
    data_dir: str | None = typer.Option(
        None, "--data-dir", help="Data directory [default: $IQA_DATA_DIR or ./iqa-data]."
    ),
    name: str | None = typer.Option(None, "--name", help="Dataset name in the rows and file name [default: DATASET]."),
    levels: int = typer.Option(5, "--levels", help="Number of quality levels K, 2..12."),
    level_names: str | None = typer.Option(
        None, "--level-names", help="Comma-separated names (ascending quality), or 'quality' / 'numbers'."
    ),
    density: str | None = typer.Option(None, "--density", help="Soft-label mode cdf|pdf [default: per dataset]."),
    std_threshold: float = typer.Option(0.2, "--std-threshold", help="Normalized std below this: two-point label."),
    mean_threshold: float = typer.Option(
        0.1, "--mean-threshold", help="Recovered mean missing the MOS by more than this: two-point label."
    ),
    pseudo_std: float | None = typer.Option(
        None, "--pseudo-std", help="Std as a fraction of the MOS range where none is given [pipal: 0.2]."
    ),
    split: str | None = typer.Option(
        None, "--split", help='Split file: DeQA-Score split.json {"train": [...], "test": [...]} or CSV image,split.'
    ),
    test_frac: float = typer.Option(0.2, "--test-frac", help="Test fraction of the seeded split."),
    seed: int = typer.Option(0, "--seed", help="Seed of the seeded split."),
    strict: bool = typer.Option(False, "--strict", help="Fail on unusable rows or missing images instead of dropping."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", help="No warnings on stderr."),
    image_col: str | None = typer.Option(None, "--image-col", help="custom: column of image paths."),
    mos_col: str | None = typer.Option(None, "--mos-col", help="custom: column of MOS."),
    std_col: str | None = typer.Option(None, "--std-col", help="custom: column of std (optional)."),
    lower_is_better: bool = typer.Option(False, "--lower-is-better", help="custom: scores are DMOS-like."),
) -> None:
    import json
    from pathlib import Path

    from iqa_cli.datasets import ReadOptions
    from iqa_cli.prepare import PrepareConfig, prepare_dataset

    def as_path(value: str | None) -> Path | None:
        return None if value is None else Path(value)

    config = PrepareConfig(
        dataset=dataset,
        source=Path(csv),
        images=as_path(images),
        out=as_path(out),
        data_dir=as_path(data_dir),
        name=name,
        levels=levels,
        level_names=level_names,
        density=density,
        std_threshold=std_threshold,
        mean_threshold=mean_threshold,
        pseudo_std=pseudo_std,
        split=as_path(split),
        test_frac=test_frac,
        seed=seed,
        strict=strict,
        read_options=ReadOptions(image_col, mos_col, std_col, lower_is_better),
    )
    result = prepare_dataset(config)
    if not quiet:
        for note in result.notes:
            err_console.print(f"warning: {note}", markup=False)
    if json_output:
        print(json.dumps(result.summary, indent=2))
    else:
        _print_prepare_summary(result.summary)


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
def score(
    inputs: list[str] | None = typer.Argument(
        None, help="Image folders (searched recursively, hidden files skipped) and image files.", show_default=False
    ),
    out: str = typer.Option(..., "--out", "-o", help="Output file (.parquet, .csv or .jsonl)."),
    from_file: str | None = typer.Option(
        None, "--from", help="List of images: CSV/TSV/Parquet with an image/path/file column, or one path per line."
    ),
    from_column: str | None = typer.Option(None, "--from-column", help="Column of --from holding the paths."),
    root: str | None = typer.Option(
        None, "--root", help="Folder that relative --from paths are under; images are named relative to it."
    ),
    model: str = typer.Option("zhiyuanyou/DeQA-Score-Mix3", "--model", help="Hugging Face repo id or directory."),
    base: str | None = typer.Option(None, "--base", help="Base model of a LoRA adapter."),
    revision: str | None = typer.Option(None, "--revision", help="Model revision (branch, tag or commit)."),
    prompt: str | None = typer.Option(None, "--prompt", help="Full scoring prompt containing <|image|>."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (bfloat16 on CUDA if supported), float32, bfloat16, float16."
    ),
    batch_size: str = typer.Option("auto", "--batch-size", help="Images per model call, or auto (halves on CUDA OOM)."),
    workers: int | None = typer.Option(
        None, "--workers", help="Decoding processes [default: one per core, at most 8]; 0 decodes in the main process."
    ),
    fmt: str | None = typer.Option(None, "--format", help="parquet, csv or jsonl [default: from the --out suffix]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output or interrupted run."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Score images into a Parquet file: one row per image with score, std, level probabilities and errors.

    An interrupted run (Ctrl-C, kill, crash) resumes when the same command is run again; finished images
    are kept in OUT.parts/ until the output is written. Under torchrun, ranks split the images.
    """
    from pathlib import Path

    from iqa_cli.score import ScoreConfig, ScoreInterrupted, score_images

    config = ScoreConfig(
        out=Path(out),
        inputs=list(inputs or []),
        from_file=Path(from_file) if from_file else None,
        from_column=from_column,
        root=Path(root) if root else None,
        model=model,
        base=base,
        revision=revision,
        prompt=prompt,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        workers=workers,
        format=fmt,
        overwrite=overwrite,
        quiet=quiet,
    )
    if not config.inputs and config.from_file is None:
        raise UserError("no inputs: give image folders or files, or --from FILE")
    try:
        summary = score_images(config, console=err_console)
    except ScoreInterrupted as exc:
        err_console.print(f"{exc}; run the same command to resume", markup=False, soft_wrap=True)
        raise typer.Exit(128 + exc.signum) from None
    if not summary.is_main:
        return
    if not quiet:
        for note in summary.warnings:
            err_console.print(f"warning: {note}", markup=False, soft_wrap=True)
        if summary.already_complete:
            err_console.print(
                f"{out} is complete ({summary.total} images); nothing to do (--overwrite recomputes it)",
                markup=False,
                soft_wrap=True,
            )
            return
        resumed = f", {summary.resumed} from the interrupted run" if summary.resumed else ""
        err_console.print(
            f"scored {summary.scored} of {summary.total} images ({summary.failed} failed{resumed}) in "
            f"{summary.seconds:.1f} s, {summary.images_per_second:.1f} images/s -> {out}",
            markup=False,
            soft_wrap=True,
        )
        for image, reason in summary.first_errors:
            err_console.print(f"  failed: {image}: {reason}", markup=False, soft_wrap=True)
    if summary.total and summary.failed == summary.total:
        err_console.print(f"error: none of the {summary.total} images could be read", markup=False, soft_wrap=True)
        raise typer.Exit(1)


# --- train ---------------------------------------------------------------------------------------
@app.command()
def train() -> None:
    """Fine-tune a multimodal LLM on prepared datasets (not implemented yet)."""
    raise UserError("`iqa train` is not implemented yet")


def main() -> None:
    """Console-script entry point: user mistakes become one line on stderr and exit code 2."""
    try:
        # Fixed names so `python -m iqa_cli` and the installed script complete the same way.
        app(prog_name="iqa", complete_var="_IQA_COMPLETE")
    except UserError as exc:
        message = " ".join(str(exc).split())
        err_console.print(f"error: {message}", markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)
