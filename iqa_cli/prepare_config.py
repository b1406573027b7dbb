"""What `iqa prepare` takes: `PrepareConfig`, whose fields declare the command's flags (help, default, panel), and
the label options' choices and defaults (`iqa_cli.labels` computes with them). Imports nothing heavy, so
`iqa prepare --help` needs no numpy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from iqa_cli.datasets import ReadOptions
from iqa_cli.option_field import option

MIN_LEVELS, MAX_LEVELS = 2, 12
DENSITIES = ("cdf", "pdf")
DEFAULT_STD_THRESHOLD = 0.2
DEFAULT_MEAN_THRESHOLD = 0.1
LABEL_RULES = ("reference", "renormalized")
DEFAULT_LABEL_RULE = "reference"
SOFT_LABELS = ("gaussian", "histogram")  # DeQA-Score's labels from (MOS, std), or a dataset's measured vote counts


@dataclass(frozen=True)
class PrepareConfig:
    """Everything `iqa prepare` needs; field names follow the command-line flags."""

    panel: ClassVar[str] = "Labels"

    dataset: str = option(cli=False)  # the command's argument: a preset or "custom"
    source: Path = option(
        help="The metadata file, or its directory (see above).", switch="--csv", metavar="FILE", required=True,
        panel="Input",
    )  # fmt: skip
    images: Path | None = option(
        None, "Image root (stored absolute in the meta): rows whose image is missing are dropped with a warning "
        "(--strict: an error); a moved image is found by its file name.", metavar="DIR", panel="Input",
    )  # fmt: skip
    out: Path | None = option(
        None, "Output Parquet file [default: DATA_DIR/NAME.parquet].", metavar="FILE", panel="Output"
    )
    data_dir: Path | None = option(
        None, "Data directory [default: $IQA_DATA_DIR or ./iqa-data].", metavar="DIR", panel="Output"
    )
    name: str | None = option(
        None, "Dataset name in the rows and file name [default: DATASET].", metavar="NAME", panel="Output"
    )
    levels: int = option(5, f"Number of quality levels K, {MIN_LEVELS}..{MAX_LEVELS}.", metavar="K")
    level_names: str | Sequence[str] | None = option(
        None, "Comma-separated names (ascending quality), or 'quality' / 'numbers' [default: bad,poor,fair,good,"
        "excellent for 5 levels, else one,two,...].", metavar="NAMES",
    )  # fmt: skip
    density: str | None = option(
        None, f"Soft-label mode {'|'.join(DENSITIES)} [default: the dataset's: pdf for koniq and kadid, as the "
        "released models; cdf (the paper) for the others].", metavar="MODE", completion="densities",
    )  # fmt: skip
    std_threshold: float = option(DEFAULT_STD_THRESHOLD, "Normalized std below this: two-point label.", metavar="X")
    mean_threshold: float = option(
        DEFAULT_MEAN_THRESHOLD, "Recovered mean missing the MOS by more than this: two-point label.", metavar="X"
    )
    label_rule: str = option(
        DEFAULT_LABEL_RULE, "reference: DeQA-Score's gen_soft_label.py bit for bit (the released models' labels). "
        "renormalized: clipped labels rescaled to sum 1, no +1e-9 in alpha (a MOS of exactly 3 is not made uniform), "
        "exact two-point interpolation.", metavar="RULE", completion="label_rules",
    )  # fmt: skip
    pseudo_std: float | None = option(
        None, "Std as a fraction of the MOS range where none is given [default: 0.2 for pipal; else no std].",
        metavar="X",
    )  # fmt: skip
    soft_labels: str = option(
        "gaussian", "gaussian: DeQA-Score's labels from MOS and std. histogram: the measured vote histogram (ava).",
        metavar="KIND", completion="soft_label_kinds",
    )  # fmt: skip
    task: str | None = option(
        None, "What the scores rate: quality or aesthetics [default: per dataset].", metavar="TASK",
        completion="tasks",
    )  # fmt: skip
    split: Path | None = option(
        None, 'Split file: DeQA-Score split.json {"train": [...], "test": [...]} or CSV image,split [default: a '
        "seeded split, --test-frac and --seed].", metavar="FILE", panel="Split",
    )  # fmt: skip
    test_frac: float = option(0.2, "Test fraction of the seeded split.", metavar="X", panel="Split")
    seed: int = option(0, "Seed of the seeded split.", metavar="N", panel="Split")
    strict: bool = option(False, "Fail on unusable rows or missing images instead of dropping.", panel="Input")
    read_options: ReadOptions = option(default_factory=ReadOptions)  # the custom reader's flags

    @classmethod
    def from_options(cls, dataset: str, **options) -> PrepareConfig:
        """The config of `iqa prepare DATASET` from its parsed flags (the custom reader's among them)."""
        read = {f.name: options.pop(f.name) for f in fields(ReadOptions) if f.name in options}
        return cls(dataset=dataset, **options, read_options=ReadOptions(**read))
