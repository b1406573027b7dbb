"""How an `iqa eval` report is shown: rich tables on stdout, notes on stderr, and the optional plot."""

import math
from pathlib import Path

import numpy as np

from iqa_cli.errors import UserError
from iqa_cli.evaluate import POOLED, EvalReport
from iqa_cli.files import atomic_file
from iqa_cli.metrics import logistic_4params
from iqa_cli.paths import check_output_file


def _fmt(value: float | None, flag: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4f}{flag}"


def report_tables(report: EvalReport) -> list:
    """Rich tables: agreement (PLCC ... RMSE) and, when both sides have std, the Gaussian gaps."""
    from rich import box
    from rich.table import Table

    title = f"{report.column} vs {report.target} (split: {report.split})"
    main = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", caption_justify="left")
    for name in ("dataset", "n", "PLCC", "PLCC-log", "SRCC", "KRCC", "RMSE", "RMSE-log"):
        main.add_column(name, justify="left" if name == "dataset" else "right", no_wrap=name != "dataset")
    flagged = False
    for group in report.results:
        m = group.metrics
        flag = "" if m.logistic_converged else "*"
        flagged |= bool(flag) and math.isfinite(m.plcc_logistic)
        main.add_row(
            group.name,
            str(m.n),
            _fmt(m.plcc),
            _fmt(m.plcc_logistic, flag if math.isfinite(m.plcc_logistic) else ""),
            _fmt(m.srcc),
            _fmt(m.krcc),
            _fmt(m.rmse),
            _fmt(m.rmse_logistic, flag),
        )
    if flagged:
        main.caption = "* no usable logistic fit (failed, a step, or the wrong direction; see notes): raw value shown"
    tables = [main]
    if any(g.metrics.kl is not None for g in report.results):
        title = "KL(human || predicted), JS, W2 (means over images)"
        gaps = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", caption_justify="left")
        for name in ("dataset", "n", "KL", "JS", "W2", "JS-DeQA"):
            gaps.add_column(name, justify="left" if name == "dataset" else "right", no_wrap=name != "dataset")
        for group in report.results:
            m = group.metrics
            gaps.add_row(group.name, str(m.n), _fmt(m.kl), _fmt(m.js), _fmt(m.w2), _fmt(m.js_moment))
        gaps.caption = "JS integrated numerically; JS-DeQA: DeQA-Score's moment-matched approximation"
        tables.append(gaps)
    return tables


def report_messages(report: EvalReport) -> list[str]:
    """One-line summaries for stderr: what was matched, what was left out and why."""
    c, ex = report.counts, report.examples
    by = ", ".join(f"{v} {k}" for k, v in report.matched_by.items() if v)
    lines = [
        f"{c['scored']} of {c['matched']} matched predictions scored against "
        f"{report.ground_truth or report.predictions} (split {report.split}; matched by {by or 'none'})"
    ]

    def add(count: int, text: str, key: str) -> None:
        if count:
            lines.append(f"warning: {count} {text} (e.g. {', '.join(ex[key])})")

    add(c["failed"], "predictions failed (error set or no score) and are not scored", "failed")
    add(c["unmatched_predictions"], "predictions have no ground truth", "unmatched_predictions")
    add(c["ambiguous_predictions"], "predictions match several ground-truth images by name", "ambiguous_predictions")
    add(c["duplicate_predictions"], "predictions repeat an image already matched", "duplicate_predictions")
    add(c["missing_predictions"], "ground-truth images have no prediction", "missing_predictions")
    if c["outside_split"]:
        lines.append(f"note: {c['outside_split']} predictions are of images outside split {report.split!r}")
    lines += [f"note: {n}" for n in report.notes]
    for group in report.results:
        lines += [f"note [{group.name}]: {n}" for n in group.metrics.notes]
        if group.metrics.srcc < -0.5:  # NaN compares False
            lines.append(
                f"warning [{group.name}]: SRCC is {group.metrics.srcc:.3f}: is this ground truth a DMOS (lower is "
                "better)? Evaluate against the meta of `iqa prepare` (it flips such scores) instead"
            )
    return lines


def require_matplotlib() -> None:
    """Fails early, with the install command, when the optional plotting extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UserError(
            "--plot needs matplotlib: pip install matplotlib (or, in a checkout of iqa, pip install -e '.[plot]')"
        ) from exc


def plot_file(plot: str | Path) -> Path:
    """The file `--plot` writes: NAME as given, or NAME.png when it has no suffix (what savefig would write
    anyway, now also the name the message gives). The suffix must be a format savefig writes."""
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(plot)
    if not path.suffix:
        path = path.with_name(f"{path.name}.png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        known = ", ".join(f".{name}" for name in sorted(formats))
        raise UserError(f"--plot {plot}: matplotlib cannot write {path.suffix} files; use one of {known}")
    return path


def check_outputs(json_out: str | None, plot: str | None) -> Path | None:
    """Checks --json and --plot before anything is read or printed, so a bad path costs no work and no tables
    precede the error. Returns the file --plot will write (None without --plot)."""
    if json_out is not None and json_out != "-":
        check_output_file(Path(json_out), "--json", example="eval.json")
    if plot is None:
        return None
    path = plot_file(plot)
    check_output_file(path, "--plot", example="eval.png")
    return path


def plot_report(report: EvalReport, path: Path) -> Path:
    """Predicted vs human scatter with the fitted logistic curve, one panel per dataset; returns the file written
    (`plot_file(path)`: PNG unless the suffix names another format)."""
    path = plot_file(path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [g for g in report.results if g.name != POOLED or len(report.results) == 1]
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    table = report.matched
    for i, group in enumerate(groups):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        part = table if group.name == POOLED else table[table["dataset"] == group.name]
        ax.scatter(part["pred"], part["target"], s=12 if len(part) < 2000 else 4, alpha=0.5, linewidths=0)
        m = group.metrics
        if m.logistic_params is not None:
            x = np.linspace(np.nanmin(part["pred"]), np.nanmax(part["pred"]), 200)
            ax.plot(x, logistic_4params(x, *m.logistic_params), color="C3", lw=1.5, label="logistic fit")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{group.name}  PLCC-log {_fmt(m.plcc_logistic)}  SRCC {_fmt(m.srcc)}  n={m.n}", fontsize=9)
        ax.set_xlabel(f"predicted {report.column}")
        ax.set_ylabel(f"human {report.target}")
        ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # complete or absent, even when the disk fills up
        fig.savefig(tmp, dpi=120, format=path.suffix[1:].lower())
    return path
