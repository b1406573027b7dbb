"""What `iqa score` is asked to do (`ScoreConfig`), the one check of it before any work, and what a run reports."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from iqa_cli import interrupts
from iqa_cli.errors import UserError
from iqa_cli.model_options import ModelSpec
from iqa_cli.paths import check_output_dir, check_output_file
from iqa_cli.scoring.output import output_format, standard_columns
from iqa_cli.sources import SourceOptions

AUTO_BATCH = {"cuda": 64, "cpu": 16}  # first batch size of `--batch-size auto`; halves on CUDA OOM


@dataclass
class ScoreConfig:
    """Everything `iqa score` was asked to do."""

    out: Path
    inputs: list[str] = field(default_factory=list)  # folders, files, shards, Parquet files, patterns
    from_file: Path | None = None  # --from: CSV/TSV/Parquet with a path column, or one path per line
    from_column: str | None = None
    root: Path | None = None
    model: ModelSpec = field(default_factory=ModelSpec)  # which model and how (a repo id or folder: its defaults)
    device: str = "auto"
    batch_size: int | str = "auto"  # positive int or "auto"
    workers: int | None = None  # DataLoader processes; None = one per core (at most 8) per local rank
    fast_decode: bool = False  # JPEGs decoded at a smaller DCT scale, torch's resize (not the reference's pixels)
    format: str | None = None  # parquet|csv|jsonl; None = from the suffix of `out`, else parquet
    overwrite: bool = False
    wait: bool = False  # another run on the same --out: wait for it instead of refusing
    quiet: bool = False
    flush_rows: int = 65536  # write the rows of unfinished units when they are this many ...
    flush_seconds: float = 30.0  # ... or after this many seconds, whichever comes first
    image_col: str | None = None  # --image-col: the image column of Parquet inputs (default "image")
    keep: list[str] = field(default_factory=list)  # --keep: input columns copied into the output rows
    out_dir: bool = False  # --out DIR/: one Parquet file per input shard, Parquet file or run of images

    def __post_init__(self) -> None:
        if isinstance(self.model, (str, Path)):
            self.model = ModelSpec(str(self.model))

    def source_options(self) -> SourceOptions:
        return SourceOptions(self.from_file, self.from_column, self.root, self.image_col, list(self.keep))


@dataclass(frozen=True)
class CheckedOptions:
    """What `check` derived from a `ScoreConfig`."""

    fmt: str  # parquet | csv | jsonl
    directory: bool  # --out DIR/: one Parquet file per output stem of the source
    batch_size: int | None  # None: auto


def check(config: ScoreConfig) -> CheckedOptions:
    """Every check of the options that needs no input listed and no model loaded: one line, exit 2, nothing written.

    Raises:
        UserError: the first mistake found.
    """
    out = Path(config.out)
    directory = config.out_dir or out.is_dir()
    if directory:
        if config.format not in (None, "parquet"):
            raise UserError(f"--format {config.format}: --out {out}/ writes one Parquet file per unit of the input")
        fmt = "parquet"
        check_output_dir(out, "--out")
    else:
        fmt = output_format(out, config.format)
        check_output_file(out, "--out", example="scores.parquet")
    batch_size = parse_batch_size(config.batch_size)
    if config.workers is not None and config.workers < 0:
        raise UserError(f"--workers {config.workers}: use 0 (decode in the main process) or more")
    config.model.check()
    taken = [c for c in config.keep if c in standard_columns()]
    if taken:
        raise UserError(f"--keep {taken[0]}: the output has a column {taken[0]!r} of its own; keep other columns")
    return CheckedOptions(fmt, directory, batch_size)


def parse_batch_size(value: int | str) -> int | None:
    """A positive int, or None for `auto`."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return None
        try:
            value = int(value)
        except ValueError:
            raise UserError(f"--batch-size {value}: use a positive integer or 'auto'") from None
    if value <= 0:
        raise UserError(f"--batch-size {value}: use a positive integer or 'auto'")
    return value


@dataclass
class ScoreSummary:
    """What a run did; `total`/`failed` cover the whole output, `processed`/`seconds` this run."""

    out: Path
    total: int = 0  # rows in the output
    failed: int = 0  # rows with `error` set
    processed: int = 0  # images scored by this run (all ranks)
    processed_by_rank: list[int] = field(default_factory=list)
    resumed: int = 0  # units found finished in the sidecar
    seconds: float = 0.0  # wall time of the scoring loop
    already_complete: bool = False  # the output existed and matched; nothing was done
    is_main: bool = True  # False on ranks > 0, which do not write the output
    first_errors: list[tuple[str, str]] = field(default_factory=list)  # (image, error) of a few failures
    unit_errors: list[tuple[str, str]] = field(default_factory=list)  # (shard, error) of units that broke off
    warnings: list[str] = field(default_factory=list)

    @property
    def scored(self) -> int:
        return self.total - self.failed

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


class ScoreInterrupted(interrupts.Interrupted):
    """SIGINT/SIGTERM arrived; finished rows were flushed and the same command resumes.

    A KeyboardInterrupt, so `except Exception` blocks pass it through and DataLoader workers exit quietly.
    """

    def __init__(self, signum: int, sidecar: Path):
        super().__init__(signum)
        self.message = f"interrupted by {signal.Signals(signum).name}; finished images are saved in {sidecar}"

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def interruptible(sidecar: Path, *, defer: bool = False) -> Iterator[None]:
    """`interrupts.signals_raise` whose interruption names the sidecar, so `finally` blocks save finished rows
    and the CLI can say where they are."""
    try:
        with interrupts.signals_raise(defer=defer):
            yield
    except ScoreInterrupted:
        raise
    except interrupts.Interrupted as exc:
        raise ScoreInterrupted(exc.signum, sidecar) from None
