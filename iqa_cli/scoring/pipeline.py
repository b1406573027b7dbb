"""Streaming batch scoring: inputs -> DataLoader workers -> model -> Parquet parts -> one output file.

How a run survives being killed at any moment:

- Results are appended to *parts*: small Parquet files in a sidecar folder next to the output
  (`scores.parquet.parts/`), each written to a temporary name, fsynced and renamed, so a part is either
  complete or absent. A part is written every `flush_rows` images or `flush_seconds` seconds, whichever
  comes first, and on Ctrl-C/SIGTERM before exiting; a kill -9 or power loss loses at most that much.
- Each row carries its input index (position in the deterministic input list). The sidecar's
  `manifest.json` records the model, levels, prompt, dtype and a fingerprint of the input list, written
  before any part. Re-running the same command reads the indices already present and scores only the
  rest; a sidecar or output made by a different model, level set, prompt, dtype or input list is refused
  unless `--overwrite`.
- When every index is present, rank 0 merges the parts in input order into `--out` (temporary file +
  rename) and removes the sidecar. The merge streams: parts written by one process in one run hold
  increasing indices, so a k-way merge over those runs holds one part per run in memory. The merge checks
  that every input appears exactly once.

One run per output: before anything else, rank 0 takes an exclusive lock on `OUT.parts/.iqa-lock`
(`iqa_cli.run_lock`); a second run on the same `--out` is refused, naming the first, or waits with `--wait`.

Under torchrun every rank takes a strided share of the remaining indices and writes its own parts; the
ranks meet at a barrier and rank 0 merges, so the output equals the single-process one. Parts from
earlier runs count whatever world size wrote them.

Failed images (unreadable, truncated, not an image, decompression bomb) become rows with `error` set and
null scores; they are results like any other and are not retried on resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from iqa_cli import __version__, distributed, interrupts, run_lock
from iqa_cli.batch_buffer import BatchPool
from iqa_cli.constants import DEFAULT_MODEL
from iqa_cli.errors import UserError
from iqa_cli.inputs import InputList, find_inputs
from iqa_cli.paths import check_output_file
from iqa_cli.progress import NullBar, ProgressBar, progress_bar
from iqa_cli.scoring.store import (
    MANIFEST_VERSION,
    BatchResult,
    PartWriter,
    Sidecar,
    merge_parts,
    output_format,
    part_schema,
    read_output_metadata,
    sidecar_path,
    suffix_mismatch,
    write_output,
)
from iqa_cli.sources import is_dataset_input

DTYPES = ("auto", "float32", "bfloat16", "float16")
AUTO_BATCH = {"cuda": 64, "cpu": 16}  # first batch size of `--batch-size auto`; halves on CUDA OOM
PREFETCH = 2  # batches each DataLoader worker builds ahead


class ScorerLike(Protocol):
    """What the pipeline needs from `iqa_cli.scoring.Scorer`."""

    transform: Callable[[Any], dict[str, torch.Tensor]]  # RGB image -> the backbone's visual inputs; picklable
    collate: Callable[..., dict[str, torch.Tensor]]  # the backbone's VisualCollate; picklable
    device: torch.device
    level_names: list[str]
    metadata: dict[str, str]
    has_regressor: bool

    def score_batch(self, visual: dict[str, torch.Tensor]) -> Any: ...


@dataclass
class ScoreConfig:
    """Everything `iqa score` was asked to do."""

    out: Path
    inputs: list[str] = field(default_factory=list)  # folders and files
    from_file: Path | None = None  # --from: CSV/TSV/Parquet with a path column, or one path per line
    from_column: str | None = None
    root: Path | None = None
    model: str = DEFAULT_MODEL
    base: str | None = None
    revision: str | None = None
    prompt: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int | str = "auto"  # positive int or "auto"
    workers: int | None = None  # DataLoader processes; None = one per core (at most 8) per local rank
    fast_decode: bool = False  # JPEGs decoded at a smaller DCT scale, torch's resize (not the reference's pixels)
    format: str | None = None  # parquet|csv|jsonl; None = from the suffix of `out`, else parquet
    overwrite: bool = False
    wait: bool = False  # another run on the same --out: wait for it instead of refusing
    quiet: bool = False
    flush_rows: int = 4096  # write a part after this many images ...
    flush_seconds: float = 30.0  # ... or after this many seconds, whichever comes first
    # Shard and Parquet inputs (iqa_cli.sources, run by iqa_cli.scoring.units):
    image_col: str | None = None  # --image-col: the image column of Parquet inputs (default "image")
    keep: list[str] = field(default_factory=list)  # --keep: input columns copied into the output rows
    out_dir: bool = False  # --out DIR/: one Parquet file per input shard
    quantize: str | None = None  # --quantize int8|int4: weight-only, through torchao
    min_pixels: int | None = None  # Qwen-VL families: pixel-count bounds of the resized image (None: the family's)
    max_pixels: int | None = None


@dataclass
class ScoreSummary:
    """What a run did; `total`/`failed` cover the whole output, `processed`/`seconds` this run."""

    out: Path
    total: int = 0  # rows in the output
    failed: int = 0  # rows with `error` set
    processed: int = 0  # images scored by this run (all ranks)
    processed_by_rank: list[int] = field(default_factory=list)
    resumed: int = 0  # images found already scored in the sidecar
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


# ---------------------------------------------------------------------------------------------------
# Options


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


def default_workers(environment: distributed.DistEnv) -> int:
    return max(1, min(8, _cores() // environment.local_world_size))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def model_threads(device: torch.device, workers: int, environment: distributed.DistEnv, current: int) -> int | None:
    """torch's intra-op threads for a CPU model while `workers` processes decode: the cores they leave (at
    least one, at most torch's `current` setting, which counts physical cores). None (leave torch's setting)
    on a GPU or when the user set OMP_NUM_THREADS: torch's default of one thread per core makes the model's
    threads and the workers fight over the same cores."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    return min(current, max(1, _cores() // environment.local_world_size - workers))


@contextlib.contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch.set_num_threads(threads) for the loop, the caller's setting back afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------
# Loading: decode + the backbone's transform in DataLoader workers, batches of one fixed shape


class ImageDataset(torch.utils.data.Dataset):
    """Decodes one input and runs the backbone's transform on it; failures come back as an error string, never
    raised."""

    def __init__(self, inputs: InputList, indices: np.ndarray, transform: Callable, load: Callable | None = None):
        self.inputs = inputs
        self.indices = indices  # int64 [n]: positions in `inputs` this rank scores
        self.transform = transform  # RGB image -> dict of tensors
        self.load = load

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, dict[str, torch.Tensor] | None, int, int, str | None]:
        index = int(self.indices[position])
        width = height = -1
        try:
            load = self.load or _default_loader()
            image = load(self.inputs.path(index))
            width, height = image.info.get("decoded_from", image.size)  # the full size of a drafted JPEG
            return index, self.transform(image), width, height, None
        except Exception as exc:  # any decoder failure is a row with `error`, not a crashed run
            return index, None, width, height, _reason(exc)


def _default_loader() -> Callable:
    from iqa_cli.images import load_image

    return load_image


def _fast_loader(scorer: ScorerLike) -> Callable:
    """`load_image` with JPEG DCT-domain downscaling to the smallest scale the model's preprocessing still only
    shrinks (`--fast-decode`); picklable for the workers."""
    import functools

    from iqa_cli.images import load_image

    draft = getattr(getattr(scorer, "preprocessor", None), "draft_size", None)
    if draft is None:
        raise UserError("--fast-decode: this model's image preprocessing does not say which decode size it needs")
    return functools.partial(load_image, draft=draft)


def decoding(scorer: ScorerLike, config: ScoreConfig, load_image: Callable | None) -> tuple[Callable, Callable | None]:
    """(transform, loader) of a run's workers. With `--fast-decode`: the transform's `fast_variant()` where the
    family has one (a faster resize, other pixels) and the DCT-scaled JPEG loader, unless a loader was given."""
    if not config.fast_decode:
        return scorer.transform, load_image
    fast = getattr(scorer.transform, "fast_variant", None)
    return (fast() if fast is not None else scorer.transform), load_image or _fast_loader(scorer)


def _reason(exc: BaseException) -> str:
    try:
        from iqa_cli.images import ImageDecodeError

        if isinstance(exc, ImageDecodeError):  # its reason without the path (the row names the image)
            return " ".join(str(getattr(exc, "reason", None) or exc).split()) or type(exc).__name__
    except ImportError:
        pass
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return " ".join(f"{type(exc).__name__}: {exc}".split())


@dataclass(frozen=True)
class PadCollate:
    """One batch of `batch_size` rows whatever its length or failures: the backbone's collate builds the visual
    inputs (padding rows as it defines them), padded rows have index -1.

    Fixed shapes keep CUDA kernels and allocator blocks reusable. Visual inputs are cast to the model's dtype
    here, in the worker, when it is a 16-bit one: half the bytes to pin and copy, and the same rounding the
    model's own cast would do. The backbone's collate allocates with `iqa_cli.batch_buffer.batch_buffer`, so a
    worker builds the batch in shared memory and handing it over copies nothing; with a `pool`, in blocks the
    worker reuses once the main process has released the batch (`BatchPool.release`).
    """

    batch_size: int
    visual_collate: Callable[..., dict[str, torch.Tensor]]  # the backbone's VisualCollate
    dtype: torch.dtype = torch.float32
    pool: BatchPool | None = None

    def __call__(self, items: list[tuple]) -> dict[str, Any]:
        b = self.batch_size
        index = torch.full((b,), -1, dtype=torch.int64)
        width = torch.full((b,), -1, dtype=torch.int32)
        height = torch.full((b,), -1, dtype=torch.int32)
        errors: list[str | None] = [None] * b
        for row, (i, _, w, h, error) in enumerate(items):
            index[row], width[row], height[row], errors[row] = i, w, h, error
        with self.pool.filling() if self.pool is not None else contextlib.nullcontext() as filling:
            visual = self.visual_collate([item[1] for item in items], b, self.dtype)
        batch = {"visual": visual, "index": index, "width": width, "height": height, "error": errors}
        if filling is not None:
            batch[BatchPool.STAMP] = filling.stamp()
        return batch


def batch_pool(workers: int, prefetch_factor: int) -> BatchPool | None:
    """The workers' reusable batch blocks; None when the main process loads (nothing is shared)."""
    return BatchPool(workers, depth=prefetch_factor + 1) if workers else None


def _transfer_dtype(scorer: ScorerLike) -> torch.dtype:
    dtype = getattr(scorer, "dtype", torch.float32)
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # each worker decodes one image at a time; threads would oversubscribe cores


def _batches(n: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _device_batches(loader: Iterator[dict], device: torch.device) -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
    """Yields (batch, visual inputs on device); on CUDA the next batch is copied on a side stream meanwhile."""
    if device.type != "cuda":
        for batch in loader:
            yield batch, batch["visual"]
        return
    copy_stream = torch.cuda.Stream(device)

    def send(batch: dict) -> dict[str, torch.Tensor]:
        with torch.cuda.stream(copy_stream):
            return {name: t.to(device, non_blocking=True) for name, t in batch["visual"].items()}

    it = iter(loader)
    upcoming = next(it, None)
    upcoming_gpu = send(upcoming) if upcoming is not None else None
    while upcoming is not None:
        batch, visual = upcoming, upcoming_gpu
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copy_stream)
        for tensor in visual.values():
            tensor.record_stream(compute)
        upcoming = next(it, None)
        upcoming_gpu = send(upcoming) if upcoming is not None else None
        yield batch, visual


# ---------------------------------------------------------------------------------------------------
# Scoring with OOM back-off


class BatchRunner:
    """Calls `score_batch` in chunks of `size` rows; with `auto`, halves `size` on CUDA OOM and retries.

    Every visual input of a batch has its rows first (the backbone's collate guarantees it).
    """

    def __init__(self, scorer: ScorerLike, size: int, *, auto: bool):
        self.scorer = scorer
        self.size = size
        self.auto = auto
        self.first_size = size

    def __call__(self, visual: dict[str, torch.Tensor]) -> BatchResult:
        parts: list[BatchResult] = []
        start, total = 0, next(iter(visual.values())).shape[0]
        while start < total:
            n = min(self.size, total - start)
            chunk = {name: rows_padded(t[start : start + n], self.size) for name, t in visual.items()}
            try:
                result = self.scorer.score_batch(chunk)
            except torch.OutOfMemoryError:
                if not self.auto or self.size == 1:
                    raise
                result = None
            if result is None:  # outside `except`, so the failed call's activations are already freed
                self.size //= 2
                _free_cuda_memory()
                continue
            parts.append(_to_numpy(result, n))
            start += n
        return BatchResult(
            probs=np.concatenate([p.probs for p in parts]),
            score=np.concatenate([p.score for p in parts]),
            std=np.concatenate([p.std for p in parts]),
            score_reg=None if parts[0].score_reg is None else np.concatenate([p.score_reg for p in parts]),
        )


def rows_padded(rows: torch.Tensor, size: int) -> torch.Tensor:
    """`rows` with zero rows appended up to `size`: one shape per call when the size does not divide the batch."""
    if rows.shape[0] == size:
        return rows
    return torch.cat([rows, rows.new_zeros(size - rows.shape[0], *rows.shape[1:])])


def _free_cuda_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _to_numpy(result: Any, n: int) -> BatchResult:
    reg = getattr(result, "score_reg", None)
    return BatchResult(
        probs=result.probs[:n].float().cpu().numpy(),
        score=result.score[:n].float().cpu().numpy(),
        std=result.std[:n].float().cpu().numpy(),
        score_reg=None if reg is None else reg[:n].float().cpu().numpy(),
    )


# ---------------------------------------------------------------------------------------------------
# The run


def _request(config: ScoreConfig) -> dict[str, str | None]:
    """The options that decide the scores (compared before loading a model to spot a finished output)."""
    from iqa_cli.files import directory_fingerprint

    return {
        "model": config.model,
        "model_files": directory_fingerprint(config.model),  # a checkpoint re-saved into the same directory
        "base": config.base,
        "base_files": directory_fingerprint(config.base) if config.base else None,
        "revision": config.revision,
        "prompt": config.prompt,
        "dtype": config.dtype,
        "decode": "fast" if config.fast_decode else "exact",
        **({"quantize": config.quantize} if config.quantize else {}),
        **({"image_col": config.image_col, "keep": config.keep} if config.image_col or config.keep else {}),
        **{k: v for k, v in (("min_pixels", config.min_pixels), ("max_pixels", config.max_pixels)) if v is not None},
    }


@dataclass
class _Plan:
    status: str  # "run" | "complete" | "error"
    message: str = ""
    metadata: dict[str, str] = field(default_factory=dict)  # the scorer's metadata of the run
    level_names: list[str] = field(default_factory=list)
    has_regressor: bool = False


class _LazyScorer:
    """Loads the model only when a decision or the work needs it."""

    def __init__(self, factory: Callable[[], ScorerLike]):
        self.factory = factory
        self.scorer: ScorerLike | None = None

    def get(self) -> ScorerLike:
        if self.scorer is None:
            self.scorer = self.factory()
        return self.scorer


def _describe_difference(
    recorded: dict[str, Any], *, fingerprint: str, num_inputs: int, request: dict, scorer: _LazyScorer
) -> str | None:
    """None when a recorded run (manifest or output metadata) matches this one, else what differs."""
    then, now = (recorded.get("request") or {}).get("decode", "exact"), request.get("decode", "exact")
    if then != now:  # not in the scorer's metadata: the same model, other pixels
        return f"a different decode mode ({then!r}, now {now!r}: --fast-decode decodes JPEGs at a smaller scale)"
    if recorded.get("inputs_fingerprint") != fingerprint:
        then = recorded.get("num_inputs", "?")
        return f"a different list of inputs ({then} images then, {num_inputs} now)"
    if recorded.get("request") == request:
        return None
    current = scorer.get().metadata
    previous = recorded.get("metadata", {})
    for key in sorted(set(current) | set(previous)):
        if key in ("iqa_version",):
            continue
        if current.get(key) != previous.get(key):
            return f"a different {key} ({previous.get(key)!r}, now {current.get(key)!r})"
    return None


def _plan(config: ScoreConfig, fmt: str, inputs: InputList, fingerprint: str, scorer: _LazyScorer) -> _Plan:
    """Rank 0 decides: resume the sidecar, report a finished output, or start a new sidecar."""
    out, request = Path(config.out), _request(config)
    sidecar = Sidecar(out)
    compare = {"fingerprint": fingerprint, "num_inputs": len(inputs), "request": request, "scorer": scorer}
    if sidecar.exists():
        manifest = sidecar.read_manifest()
        if manifest is not None and manifest.get("manifest_version") == MANIFEST_VERSION:
            difference = _describe_difference(manifest, **compare)
            if difference is None:
                sidecar.remove_temporaries()
                return _Plan(
                    "run",
                    metadata=manifest["metadata"],
                    level_names=manifest["level_names"],
                    has_regressor=manifest["has_regressor"],
                )
            if not config.overwrite:
                raise UserError(
                    f"{sidecar.dir} holds an interrupted run with {difference}; "
                    "re-run with its options to resume, or pass --overwrite to discard it"
                )
        sidecar.remove()  # no manifest = a crash while creating it; nothing in it is usable
    if out.exists() and not config.overwrite:
        recorded = read_output_metadata(out, fmt)
        if recorded is None:
            raise UserError(f"{out} exists and was not written by `iqa score`; pass --overwrite to replace it")
        recorded = {**recorded, "request": _json_or_none(recorded.get("request"))}
        recorded["metadata"] = _json_or_none(recorded.get("scorer_metadata")) or {}
        difference = _describe_difference(recorded, **compare)
        if difference is None:
            return _Plan("complete")
        raise UserError(f"{out} exists and was written with {difference}; pass --overwrite to replace it")
    return start_run(sidecar, request, fingerprint, len(inputs), scorer)


def start_run(sidecar: Sidecar, request: dict, fingerprint: str, num_inputs: int, scorer: _LazyScorer) -> _Plan:
    """A new run: its manifest (what a resume must match) written before any part, and its plan."""
    model = scorer.get()
    sidecar.create(
        {
            "manifest_version": MANIFEST_VERSION,
            "iqa_version": __version__,
            "request": request,
            "metadata": dict(model.metadata),
            "level_names": list(model.level_names),
            "has_regressor": bool(model.has_regressor),
            "inputs_fingerprint": fingerprint,
            "num_inputs": num_inputs,
        }
    )
    return _Plan(
        "run", metadata=dict(model.metadata), level_names=list(model.level_names), has_regressor=model.has_regressor
    )


def _json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def output_metadata(plan: _Plan, request: dict, fingerprint: str, num_inputs: int) -> dict[str, str]:
    """The scorer's metadata plus what identifies this output (version, input list, request)."""
    return {
        **plan.metadata,
        "iqa_version": __version__,
        "inputs_fingerprint": fingerprint,
        "num_inputs": str(num_inputs),
        "request": json.dumps(request, sort_keys=True),
        "scorer_metadata": json.dumps(plan.metadata, sort_keys=True),
        "decode": request.get("decode", "exact"),  # "fast": JPEGs decoded at a smaller DCT scale (--fast-decode)
    }


def _decide_on_main(fn: Callable[[], _Plan], environment: distributed.DistEnv) -> _Plan:
    """Runs `fn` on rank 0 and hands its plan (or its user error) to every rank."""
    plan: _Plan | None = None
    if environment.is_main:
        try:
            plan = fn()
        except UserError as exc:
            plan = _Plan("error", message=str(exc))
        except BaseException as exc:
            distributed.broadcast_object(_Plan("error", message=f"rank 0 failed: {exc!r}"))
            raise
    plan = distributed.broadcast_object(plan)
    if plan.status == "error":
        raise UserError(plan.message)
    return plan


@contextlib.contextmanager
def _signals_raise(sidecar: Path, *, defer: bool = False) -> Iterator[None]:
    """`interrupts.signals_raise` whose interruption names the sidecar, so `finally` blocks flush finished rows
    and the CLI can say where they are."""
    try:
        with interrupts.signals_raise(defer=defer):
            yield
    except ScoreInterrupted:
        raise
    except interrupts.Interrupted as exc:
        raise ScoreInterrupted(exc.signum, sidecar) from None


def score_images(
    config: ScoreConfig,
    *,
    scorer_factory: Callable[[torch.device], ScorerLike] | None = None,
    load_image: Callable | None = None,
    console: Any = None,
) -> ScoreSummary:
    """Scores every input of `config` into `config.out`; resumes an interrupted run of the same command.

    Args:
        scorer_factory: builds the scorer for a device (tests pass a fake); default `Scorer.from_pretrained`.
        load_image: path -> RGB PIL image (default `iqa_cli.images.load_image`).
        console: rich console for progress and messages (stderr).

    Raises:
        UserError: bad options, missing inputs, an unwritable or conflicting output.
        ScoreInterrupted: SIGINT/SIGTERM; finished rows are saved and the same command resumes.
    """
    if config.out_dir or is_dataset_input(config.inputs, config.from_file, config.image_col):
        from iqa_cli.scoring.units import score_units  # shards and Parquet: units of work, same loop

        return score_units(config, scorer_factory=scorer_factory, load_image=load_image, console=console)
    out = Path(config.out)
    if out.is_dir():  # said by check_output_file below, before the (missing) suffix would be
        check_output_file(out, "--out", example="scores.parquet")
    fmt = output_format(out, config.format)
    batch_size = parse_batch_size(config.batch_size)
    if config.workers is not None and config.workers < 0:
        raise UserError(f"--workers {config.workers}: use 0 (decode in the main process) or more")
    if config.dtype not in DTYPES:
        raise UserError(f"--dtype {config.dtype}: use one of {', '.join(DTYPES)}")
    check_output_file(out, "--out", example="scores.parquet")
    return locked_run(
        config,
        console,
        lambda device, environment, console: _score(
            config, fmt, batch_size, device, environment, scorer_factory, load_image, console
        ),
    )


def locked_run(config: ScoreConfig, console: Any, run: Callable[..., ScoreSummary]) -> ScoreSummary:
    """What every scoring run does once its arguments are checked: a console, this rank's device, the process
    group, and the run lock of `--out` held around `run(device, environment, console)` (the files' loop here,
    the units' loop in `units.py`)."""
    if console is None:
        from rich.console import Console

        console = Console(stderr=True, highlight=False)
    out = Path(config.out)
    environment = distributed.env()
    device = distributed.resolve_device(config.device, environment)
    distributed.init(device, backend="gloo")  # ranks exchange Python objects only: no NCCL communicator
    try:
        with run_lock.hold(
            sidecar_path(out) / run_lock.LOCK_NAME,
            command="iqa score",
            target=f"--out {out}",
            wait=config.wait,
            remove_folder=True,
            say=None if config.quiet else lambda line: console.print(line, markup=False),
        ):
            return run(device, environment, console)
    finally:
        distributed.destroy()


def build_scorer(
    config: ScoreConfig, device: torch.device, scorer_factory: Callable[[torch.device], ScorerLike] | None
) -> ScorerLike:
    """The scorer of a run: `scorer_factory(device)` (tests), else `Scorer.from_pretrained` with its options."""
    if scorer_factory is not None:
        return scorer_factory(device)
    from iqa_cli.scoring.scorer import Scorer

    built = Scorer.from_pretrained(
        config.model,
        base=config.base,
        device=device,
        dtype=config.dtype,
        prompt=config.prompt,
        revision=config.revision,
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
        **({"quantize": config.quantize} if config.quantize else {}),
    )
    if config.fast_decode:
        _fast_loader(built)  # a family without a draft size is refused before any sidecar exists
    return built


def _score(
    config: ScoreConfig,
    fmt: str,
    batch_size: int | None,
    device: torch.device,
    environment: distributed.DistEnv,
    scorer_factory: Callable[[torch.device], ScorerLike] | None,
    load_image: Callable | None,
    console: Any,
) -> ScoreSummary:
    out = Path(config.out)
    show = not config.quiet and environment.is_main
    inputs = find_inputs(config.inputs, from_file=config.from_file, from_column=config.from_column, root=config.root)
    fingerprint = inputs.fingerprint()
    if len(set(distributed.all_gather_object(fingerprint))) != 1:
        raise UserError("the ranks found different lists of inputs; every rank must see the same files")
    summary = ScoreSummary(out=out, is_main=environment.is_main, warnings=list(inputs.warnings))
    if config.format is not None and (note := suffix_mismatch(out, fmt)):
        summary.warnings.insert(0, note)

    scorer = _LazyScorer(lambda: build_scorer(config, device, scorer_factory))
    plan = _decide_on_main(lambda: _plan(config, fmt, inputs, fingerprint, scorer), environment)
    if plan.status == "complete":
        summary.already_complete = True
        summary.total = len(inputs)
        return summary

    sidecar = Sidecar(out)
    done = sidecar.done_indices()
    if len(set(distributed.all_gather_object(len(done)))) != 1:  # also keeps ranks in step before writing
        raise UserError(f"the ranks see different files in {sidecar.dir}; --out must be on a shared file system")
    remaining = np.setdiff1d(np.arange(len(inputs), dtype=np.int64), done)
    mine = remaining[distributed.shard(len(remaining), environment)]
    summary.resumed = len(done)
    if show and len(done):
        console.print(f"resuming: {len(done)} of {len(inputs)} images already scored in {sidecar.dir}", markup=False)

    model = scorer.get() if len(mine) else None  # loading is not part of the timed loop
    start = time.monotonic()
    if model is not None:
        _score_indices(
            model,
            inputs,
            mine,
            sidecar,
            plan,
            config=config,
            batch_size=batch_size,
            device=torch.device(model.device),
            environment=environment,
            load_image=load_image,
            console=console if show else None,
        )
    seconds = time.monotonic() - start
    processed = distributed.all_gather_object((len(mine), seconds))  # every rank's parts are on disk now
    summary.processed_by_rank = [n for n, _ in processed]
    summary.processed = sum(summary.processed_by_rank)
    summary.seconds = max(s for _, s in processed)
    if not environment.is_main:
        return summary

    metadata = output_metadata(plan, _request(config), fingerprint, len(inputs))
    schema = part_schema(len(plan.level_names), plan.has_regressor, with_index=False)
    with _signals_raise(sidecar.dir):  # stopped mid-merge: the temporary file goes, the parts stay
        rows, failed, first_errors = write_output(out, fmt, merge_parts(sidecar, len(inputs)), schema, metadata)
        sidecar.remove()
    summary.total, summary.failed, summary.first_errors = rows, failed, first_errors
    return summary


def _score_indices(
    scorer: ScorerLike,
    inputs: InputList,
    indices: np.ndarray,
    sidecar: Sidecar,
    plan: _Plan,
    *,
    config: ScoreConfig,
    batch_size: int | None,
    device: torch.device,
    environment: distributed.DistEnv,
    load_image: Callable | None,
    console: Any,
) -> None:
    """The hot loop of one rank: loader -> device -> model -> parts.

    Every model call of a run has one shape, `size` rows with the last batch padded, so an image's
    score never depends on its batch-mates (not even in bf16, where kernels for other shapes round
    differently). A run with fewer images than the batch size uses that many rows instead: 2 images cost
    a forward pass of 2, not 16.
    """
    size = batch_size or AUTO_BATCH["cuda" if device.type == "cuda" else "cpu"]
    size = max(1, min(size, len(indices)))
    workers = default_workers(environment) if config.workers is None else config.workers
    transform, load_image = decoding(scorer, config, load_image)
    dataset = ImageDataset(inputs, indices, transform, load_image)
    pool = batch_pool(workers, PREFETCH)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_batches(len(indices), size),
        num_workers=workers,
        collate_fn=PadCollate(size, scorer.collate, _transfer_dtype(scorer), pool),
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=PREFETCH if workers else None,
    )
    runner = BatchRunner(scorer, size, auto=batch_size is None and device.type == "cuda")
    writer = PartWriter(
        sidecar,
        inputs,
        plan.level_names,
        plan.has_regressor,
        rank=environment.rank,
        flush_rows=config.flush_rows,
        flush_seconds=config.flush_seconds,
    )
    batches = iter(loader)  # forks the workers before any thread (progress, pinning) or handler exists
    progress = _progress(console, len(indices), environment)
    try:
        threads = model_threads(device, workers, environment, torch.get_num_threads())
        with _signals_raise(sidecar.dir), torch.inference_mode(), progress, _intra_op_threads(threads):
            for batch, visual in _device_batches(batches, device):
                result = runner(visual)
                progress.advance(writer.add(batch, result))
                if pool is not None:
                    pool.release(batch)
        if console is not None and runner.size != runner.first_size:
            console.print(
                f"--batch-size auto: out of GPU memory at {runner.first_size}, scored with {runner.size}",
                markup=False,
            )
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of GPU memory at --batch-size {runner.size}; use a smaller size or --batch-size auto"
        ) from None
    finally:
        with _signals_raise(sidecar.dir, defer=True):  # a second Ctrl-C must not cut the last part short
            writer.flush()
        del batches  # stops the workers now rather than when the traceback is dropped


def _progress(console: Any, total: int | None, environment: distributed.DistEnv) -> ProgressBar | NullBar:
    label = "scoring" if not environment.is_distributed else f"scoring (rank 0 of {environment.world_size})"
    return progress_bar(console, total, label)
