"""What `iqa prepare` prints: its help's list of presets, and the summary of what it wrote (the label statistics of
the DeQA-Score paper's Tables 1-2 and of its `gen_soft_label.py`, under the reference's names)."""

from __future__ import annotations

from typing import Any


def prepare_help() -> str:
    from iqa_cli.datasets import source_help

    return (
        "Build soft labels from a dataset's official metadata and write them to a Parquet file.\n\n"
        "Reads DATASET's metadata (--csv), normalizes MOS/std to [1, 5], builds one-hot and DeQA-Score soft "
        "labels, assigns train/test, writes DATA_DIR/NAME.parquet and prints the label statistics of the "
        "DeQA-Score paper's Tables 1-2 and of its gen_soft_label.py. Soft labels equal gen_soft_label.py's bit "
        "for bit unless --label-rule renormalized. Datasets with reference images (kadid, pipal, tid2013, csiq) "
        "are split by reference image.\n\n\b\nDATASET and what --csv names:\n" + source_help()
    )


def headline(summary: dict) -> str:
    splits = ", ".join(f"{k} {v}" for k, v in summary["split"].items() if k != "source")
    return f"{summary['dataset']}: {summary['rows']} rows ({splits}) -> {summary['out']}"


def label_table(summary: dict) -> Any:
    """How well one-hot and soft labels recover N(mos, std) (the paper's Tables 1-2)."""
    from rich.table import Table

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    stats = summary["labels"]
    title = f"labels: {summary['levels']} levels, {summary['density']}, rule {summary['label_rule']}"
    if summary.get("soft_labels") == "histogram":
        title = f"labels: {summary['levels']} levels, the measured vote histograms"
    table = Table(title=title, title_justify="left")
    table.add_column("recovered vs N(mos, std)")
    table.add_column("one-hot", justify="right")
    table.add_column("soft", justify="right")
    for key, label in (("l1", "L1"), ("rmse", "L2 (RMSE)"), ("plcc", "PLCC"), ("srcc", "SRCC"), ("js", "JS"),
                       ("wasserstein", "Wasserstein")):  # fmt: skip
        table.add_row(label, fmt(stats["one_hot"][key]), fmt(stats["soft"][key]))
    return table


def reference_lines(summary: dict) -> str:
    """The reference gen_soft_label.py's statistics, under its names (6 decimals; --json has them all)."""
    stats = summary["labels"]
    alpha, beta, raw, soft = stats["alpha"], stats["beta"], stats["raw"], stats["soft"]

    def ref(value) -> str:
        return "-" if value is None else f"{value:.6f}"

    return (
        f"srcc: {ref(soft['srcc'])} plcc: {ref(soft['plcc'])}\n"
        f"[raw_diff] (raw Gaussian, before adjustment) l1: {ref(raw['l1'])} l2: {ref(raw['rmse'])}\n"
        f"[diff] (soft labels) l1: {ref(soft['l1'])} l2: {ref(soft['rmse'])}\n"
        f"[alpha] mean: {ref(alpha['mean'])} std: {ref(alpha['std'])}\n"
        f"[beta] mean: {ref(beta['mean'])} std: {ref(beta['std'])}\n"
        f"binary / all (two-point fallback): {stats['fallback']} / {stats['rows']}; clipped {stats['clipped']}"
    )
