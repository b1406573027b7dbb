"""What `iqa score` is asked to do (`ScoreConfig`), the one check of it before any work, and what a run reports."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from iqa_cli import engines, interrupts
from iqa_cli.errors import UserError
from iqa_cli.model_options import ModelSpec
from iqa_cli.option_field import option
from iqa_cli.paths import check_output_dir, check_output_file
from iqa_cli.sources import SourceOptions
from iqa_cli.tasks import check_task
from iqa_cli.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, Sampling

MANIFEST = "manifest.json"  # the sidecar's record of a run (`iqa_cli.scoring.store`); named here, without pyarrow

AUTO_BATCH = {"cuda": 64, "cpu": 16}  # first batch size of `--batch-size auto`; halves on CUDA OOM


@dataclass
class ScoreConfig:
    """Everything `iqa score` was asked to do; each field declares its flag (`iqa_cli.option_field.option`)."""

    panel: ClassVar[str] = "Run"
    out: Path = option(
        help="Output file (.parquet, .csv or .jsonl), or DIR/ for one Parquet file per unit of the input (a shard, "
        "a Parquet file, a run of images).",
        metavar="FILE",
        required=True,
        alias="-o",
        raw=True,
        panel="Output",
    )
    inputs: list[str] = option(
        help="Image folders (searched recursively, hidden files skipped) and image files; or WebDataset .tar shards "
        "and Parquet files (globs, {00000..00999} ranges).",
        metavar="PATH",
        argument=True,
        default_factory=list,
    )
    from_file: Path | None = option(
        None,
        "List of inputs: CSV/TSV/Parquet with an image/path/file column, or one path (or shard) per line.",
        switch="--from",
        metavar="FILE",
        panel="Input",
    )
    from_column: str | None = option(None, "Column of --from holding the paths.", metavar="COLUMN", panel="Input")
    root: Path | None = option(
        None, "Folder that relative --from paths are under; images are named relative to it.", metavar="DIR",
        panel="Input",
    )  # fmt: skip
    image_col: str | None = option(
        None, "Image column of Parquet inputs: bytes or {bytes, path} [default: image].", metavar="COLUMN",
        panel="Input",
    )  # fmt: skip
    keep: list[str] = option(
        help="Input columns (Parquet, shard metadata, json members) copied into the rows.",
        metavar="COL,...",
        panel="Input",
        default_factory=list,
    )
    model: ModelSpec = option(cli=False, default_factory=ModelSpec)  # which model and how: `--model` and the rest
    device: str = option("auto", "auto, cpu, cuda or cuda:N.", metavar="DEVICE", completion="devices", panel="Speed")
    batch_size: int | str = option(
        "auto", "Images per model call, or auto (64 on CUDA, settled to fit; 16 on the CPU).", metavar="N",
        panel="Speed",
    )  # fmt: skip
    workers: int | None = option(
        None, "Decoding processes [default: one per core, at most 8]; 0 decodes in the main process.", metavar="N",
        panel="Speed",
    )  # fmt: skip
    fast_decode: bool = option(
        False,
        "Decode JPEGs at a 1/2-1/8 DCT scale still larger than the model's input and resize with torch's "
        "vectorized filter: faster, not the reference's pixels (scores move slightly; see README).",
        panel="Speed",
    )
    task: str | None = option(
        None, "quality or aesthetics: what the prompt asks about, for images and videos (--prompt replaces the image "
        "prompt) [default: quality, or what a trained model was trained on].", metavar="TASK", panel="Model",
    )  # fmt: skip
    fps: float | None = option(
        None, "Videos: score F frames per second of video, Q-Align's sampling [default: 1, unless --frames].",
        metavar="F", panel="Video",
    )  # fmt: skip
    frames: int | None = option(
        None,
        "Videos: score N frames spread uniformly instead (Q-ReAlign: 8) [default: off: --fps].",
        metavar="N",
        panel="Video",
    )
    max_frames: int = option(
        DEFAULT_MAX_FRAMES, "Videos: at most N frames with --fps; a longer video keeps N spread over its length.",
        metavar="N", panel="Video",
    )  # fmt: skip
    per_frame: bool = option(
        False, "Videos: also one row per sampled frame, scored as an image (column frame).", panel="Video"
    )
    engine: str = option(
        "local",
        "local: this process scores (under torchrun each rank a fixed share); ray: Ray actors on a cluster take "
        "the units as they free up (pip install 'iqa-cli[ray]'; README: Ray).",
        metavar="ENGINE",
        panel="Engine",
    )
    ray_address: str | None = option(
        None,
        "--engine ray: the cluster: auto, HOST:PORT or ray://HOST:PORT [default: RAY_ADDRESS, else the cluster "
        "`ray start` runs here, else a new local Ray]. On a cluster every path must be on storage all nodes mount.",
        metavar="ADDRESS",
        panel="Engine",
    )
    gpus_per_actor: float = option(
        1.0, "--engine ray: GPUs per actor (0.5: two on a GPU); without GPUs one CPU actor per node.", metavar="N",
        panel="Engine",
    )  # fmt: skip
    format: str | None = option(
        None, "parquet, csv or jsonl [default: from the --out suffix].", metavar="FORMAT", completion="formats",
        panel="Output",
    )  # fmt: skip
    overwrite: bool = option(False, "Replace an existing output or interrupted run.", panel="Output")
    keep_reasoning: bool = option(
        False, "Reasoning models: also write each generated answer (column `reasoning`).", panel="Output"
    )
    wait: bool = option(False, "If another run writes the same --out, wait for it to end.")
    quiet: bool = option(False, "No progress bar or summary.", alias="-q")
    flush_rows: int = option(65536, cli=False)  # write the rows of unfinished units when they are this many ...
    flush_seconds: float = option(30.0, cli=False)  # ... or after this many seconds, whichever comes first
    out_dir: bool = option(False, cli=False)  # --out DIR/ (a trailing slash): one Parquet file per unit

    def __post_init__(self) -> None:
        if isinstance(self.model, (str, Path)):
            self.model = ModelSpec(str(self.model))
        if isinstance(self.out, str):  # as typed: `scores/` asks for a folder
            self.out_dir = self.out_dir or self.out.endswith(("/", "\\"))
            self.out = Path(self.out)

    def source_options(self) -> SourceOptions:
        return SourceOptions(self.from_file, self.from_column, self.root, self.image_col, list(self.keep))

    def sampling(self) -> Sampling:
        """How videos are sampled: `video_sampling`."""
        return video_sampling(self)


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
    from iqa_cli.scoring.output import output_format, standard_columns

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
    if config.task is not None:
        check_task(config.task)
    check_sampling(config)
    taken = [c for c in config.keep if c in standard_columns()]
    if taken:
        raise UserError(f"--keep {taken[0]}: the output has a column {taken[0]!r} of its own; keep other columns")
    engines.check(config)
    return CheckedOptions(fmt, directory, batch_size)


def video_sampling(config: ScoreConfig) -> Sampling:
    """How videos are sampled (`iqa_cli.video.Sampling`): --frames N, else --fps F (default 1). Any config with
    `iqa score`'s video fields (`iqa serve`'s too)."""
    if config.frames is not None:
        return Sampling(fps=None, frames=config.frames, max_frames=config.max_frames)
    return Sampling(fps=DEFAULT_FPS if config.fps is None else config.fps, max_frames=config.max_frames)


def check_sampling(config: ScoreConfig) -> None:
    """--fps, --frames and --max-frames: one way of sampling, positive numbers."""
    if config.fps is not None and config.frames is not None:
        raise UserError(f"--fps {config.fps:g} and --frames {config.frames}: sample videos one way, not both")
    if config.fps is not None and not config.fps > 0:
        raise UserError(f"--fps {config.fps:g}: use a positive number of frames per second")
    if config.frames is not None and config.frames < 1:
        raise UserError(f"--frames {config.frames}: use 1 or more")
    if config.max_frames < 1:
        raise UserError(f"--max-frames {config.max_frames}: use 1 or more")


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
    resumed: int = 0  # rows an earlier run left in the sidecar (finished units and pieces): not scored again
    seconds: float = 0.0  # wall time of the scoring loop
    already_complete: bool = False  # the output existed and matched; nothing was done
    is_main: bool = True  # False on ranks > 0, which do not write the output
    first_errors: list[tuple[str, str]] = field(default_factory=list)  # (image, error) of a few failures
    unit_errors: list[tuple[str, str]] = field(default_factory=list)  # (shard, error) of units that broke off
    warnings: list[str] = field(default_factory=list)
    videos: int = 0  # of `total`: videos scored
    frame_rows: int = 0  # of `total`: --per-frame rows (one per sampled frame)
    frames_failed: int = 0  # of `failed`: --per-frame rows with an error

    @property
    def inputs(self) -> int:
        """Images and videos: the rows less the --per-frame rows."""
        return self.total - self.frame_rows

    @property
    def inputs_failed(self) -> int:
        return self.failed - self.frames_failed

    @property
    def noun(self) -> str:
        if not self.videos and not self.frame_rows:
            return "images"
        return "videos" if self.videos == self.inputs else "images and videos"

    @property
    def images_per_second(self) -> float:
        """Rows written per second (with --per-frame, a video's frame rows count too)."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0


class ScoreInterrupted(interrupts.Interrupted):
    """SIGINT/SIGTERM/SIGHUP arrived; finished rows were flushed and the same command resumes.

    A KeyboardInterrupt, so `except Exception` blocks pass it through and DataLoader workers exit quietly.
    """

    def __init__(self, signum: int, sidecar: Path):
        super().__init__(signum)
        name = signal.Signals(signum).name
        if (sidecar / MANIFEST).is_file():
            self.message = f"interrupted by {name}; finished images are saved in {sidecar}"
        else:  # stopped while checking, planning or loading: nothing scored yet
            self.message = f"interrupted by {name} before any image was scored"

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
