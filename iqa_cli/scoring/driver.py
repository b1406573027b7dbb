"""`iqa score`'s one driver, for every kind of input: check, lock, plan or resume by units, deal the units to ranks,
score them (`iqa_cli.scoring.local`), assemble the output from the units in input order.

How a run survives being killed at any moment: each finished unit is one file in the sidecar (`OUT.parts/`,
`iqa_cli.scoring.store`), written atomically; a unit still running writes its rows as pieces every 30 s
(`ScoreConfig.flush_seconds`, API only) and when the run is stopped, so a kill -9 loses at most the last 30 s of
work and SIGINT/SIGTERM nothing scored. The same command resumes: finished units are kept, a unit with pieces goes on
after its last piece, and the output, once every unit is finished, is the units' rows in input order. A sidecar
or output made by another model, prompt, dtype, decode mode or list of inputs is refused unless `--overwrite`;
a second run on the same `--out` is refused (or waits, `--wait`) through the run lock `OUT.parts/.iqa-lock`.

Under torchrun every rank takes a strided share of the unfinished units and writes them into the shared sidecar;
rank 0 waits for every rank's report file (not a collective: a rank may finish hours before the slowest one)
and assembles the output, which equals the single-process one. Finished units count whatever world size wrote
them. With `--engine ray` (`iqa_cli.engines`) Ray actors score the unfinished units instead, taking the next as
they free up; planning, the sidecar and the output are the same.

Failed images (unreadable, truncated, not an image, decompression bomb) become rows with `error` set and null
scores; they are results like any other and are not retried on resume. A unit that breaks off (a truncated
shard) keeps its rows before the break and is reported at the end.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iqa_cli import distributed, engines, run_lock
from iqa_cli.errors import UserError
from iqa_cli.files import atomic_write
from iqa_cli.progress import ProgressBar, progress_bar
from iqa_cli.scoring import plan as planning
from iqa_cli.scoring.config import CheckedOptions, ScoreConfig, ScoreSummary, check, interruptible
from iqa_cli.scoring.loader import fast_loader
from iqa_cli.scoring.output import (
    assemble_directory,
    assemble_file,
    output_schema,
    recorded_rows,
    suffix_mismatch,
)
from iqa_cli.scoring.store import Sidecar, SidecarState, UnitWriter, sidecar_path
from iqa_cli.sources import Source, open_inputs

ScorerFactory = Callable[[torch.device], Any]


def score_images(
    config: ScoreConfig,
    *,
    scorer_factory: ScorerFactory | None = None,
    load_image: Callable | None = None,
    console: Any = None,
) -> ScoreSummary:
    """Scores every input of `config` into `config.out`; resumes an interrupted run of the same command.

    Args:
        scorer_factory: builds the scorer for a device (tests pass a fake); default `Scorer.from_pretrained`.
        load_image: path or file object -> RGB PIL image (default `iqa_cli.images.load_image`).
        console: rich console for progress and messages (stderr).

    Raises:
        UserError: bad options, missing inputs, an unwritable or conflicting output.
        ScoreInterrupted: SIGINT/SIGTERM/SIGHUP; finished rows are saved and the same command resumes.
    """
    checked = check(config)
    if console is None:
        from rich.console import Console

        console = Console(stderr=True, highlight=False)
    out = Path(config.out)
    environment = distributed.env()
    engine = engines.open_engine(config)  # where the units are scored: this process, or Ray actors
    device = engine.resolve_device(config.device, environment)
    # A stop at any moment (planning, loading the model, scoring, assembling) unwinds through the `finally`
    # blocks below, which save the finished rows and release the lock, and ends as ScoreInterrupted.
    with interruptible(sidecar_path(out)):
        distributed.init(device, backend="gloo")  # scoring's collectives are a few small objects
        try:
            with run_lock.hold(
                sidecar_path(out) / run_lock.LOCK_NAME,
                command="iqa score",
                target=f"--out {out}",
                wait=config.wait,
                remove_folder=True,
                say=None if config.quiet else lambda line: console.print(line, markup=False),
            ):
                return _run(config, checked, device, environment, scorer_factory, load_image, console, engine)
        finally:
            engine.close()
            distributed.destroy()


def build_scorer(config: ScoreConfig, device: torch.device, scorer_factory: ScorerFactory | None) -> Any:
    """The scorer of a run: `scorer_factory(device)` (tests), else `Scorer.from_pretrained` with its options."""
    if scorer_factory is not None:
        return scorer_factory(device)
    from iqa_cli.scoring.scorer import Scorer

    built = Scorer.from_pretrained(config.model.model, device=device, task=config.task, **config.model.load_kwargs())
    if config.fast_decode:
        fast_loader(built)  # a family without a draft size is refused before any sidecar exists
    return built


def _run(
    config: ScoreConfig,
    checked: CheckedOptions,
    device: torch.device,
    environment: distributed.DistEnv,
    scorer_factory: ScorerFactory | None,
    load_image: Callable | None,
    console: Any,
    engine: Any,
) -> ScoreSummary:
    out = Path(config.out)
    show = not config.quiet and environment.is_main
    source = open_inputs(config.inputs, config.source_options())
    fingerprint = source.fingerprint()
    if len(set(distributed.all_gather_object(fingerprint))) != 1:
        raise UserError(f"the ranks found different lists of {source.noun}; every rank must see the same files")
    summary = ScoreSummary(out=out, is_main=environment.is_main, warnings=list(source.warnings))
    if not checked.directory and config.format is not None and (note := suffix_mismatch(out, checked.fmt)):
        summary.warnings.insert(0, note)

    scorer = planning.LazyScorer(lambda: engine.scorer(lambda d: build_scorer(config, d, scorer_factory), device))
    sidecar = Sidecar(out)

    def decide() -> planning.Plan:
        plan = planning.decide(config, checked.fmt, checked.directory, source, fingerprint, scorer)
        if plan.status == "run":
            sidecar.scan(len(source), clean=True)  # before any rank reads it
        return plan

    plan = planning.decide_on_main(decide, environment)
    if plan.status == "complete":
        summary.already_complete = True
        summary.total = recorded_rows(out, checked.fmt)
        return summary

    state = sidecar.scan(len(source), clean=False)
    agreed = distributed.all_gather_object((len(state.finished), sorted(state.starts.items())))
    if any(a != agreed[0] for a in agreed):  # also keeps the ranks in step before writing
        raise UserError(f"the ranks see different files in {sidecar.dir}; --out must be on a shared file system")
    remaining = np.setdiff1d(np.arange(len(source), dtype=np.int64), state.finished)
    mine = remaining[distributed.shard(len(remaining), environment)]
    starts = np.asarray([state.starts.get(u, 0) for u in mine.tolist()], dtype=np.int64)
    summary.resumed = state.rows + _rows_in_directory(out, source, state) if checked.directory else state.rows
    if show and (len(state.finished) or state.starts):
        console.print(
            f"resuming: {summary.resumed} images ({len(state.finished)} of {len(source)} {source.noun} finished) "
            f"already scored in {sidecar.dir}",
            markup=False,
        )
    if checked.directory:
        out.mkdir(parents=True, exist_ok=True)

    videos = planning.may_hold_videos(source)
    wanted = planning.request(config, videos)
    metadata = planning.output_metadata(plan, wanted, fingerprint, source.num_inputs())
    per_frame = config.per_frame and videos
    schema = output_schema(
        len(plan.level_names),
        plan.has_regressor,
        source.columns,
        reasoning=plan.reasoning,  # a reasoning model's own columns
        keep_text=config.keep_reasoning,
        videos=videos,
        per_frame=per_frame,
    ).with_metadata(metadata)
    model = scorer.get() if len(mine) else None  # loading is not part of the timed loop
    start = time.monotonic()
    processed = 0
    if model is not None:
        writer = UnitWriter(
            source,
            sidecar,
            schema,
            plan.level_names,
            directory=out if checked.directory else None,
            direct=_direct_units(source),
            starts=state.starts,
            flush_rows=config.flush_rows,
            flush_seconds=config.flush_seconds,
        )
        label = "scoring" if not environment.is_distributed else f"scoring (rank 0 of {environment.world_size})"
        progress = progress_bar(console, _known_total(source, mine, starts), label, show=show)
        with progress:
            counter = _count_in_background(source, mine, starts, progress)
            try:
                processed = engine.score_units(
                    model,
                    source,
                    mine,
                    starts,
                    writer,
                    batch_size=checked.batch_size,
                    workers=config.workers,
                    fast_decode=config.fast_decode,
                    load_image=load_image,
                    sampling=config.sampling(),
                    per_frame=per_frame,
                    local_world_size=environment.local_world_size,
                    progress=progress,
                    sidecar=sidecar.dir,
                )
            finally:  # stopped or failed too: no more reading of headers
                if counter is not None:
                    counter.stop.set()
    seconds = time.monotonic() - start
    gathered = _wait_for_ranks(sidecar, environment, processed, seconds)
    summary.processed_by_rank = [n for n, _ in gathered]
    summary.processed = sum(summary.processed_by_rank)
    summary.seconds = max(s for _, s in gathered)
    if not environment.is_main:
        return summary

    errors = sidecar.errors(source.label, len(source))
    metadata = {**metadata, "unit_errors": json.dumps(errors)}
    schema = schema.with_metadata(metadata)
    with interruptible(sidecar.dir):  # stopped mid-assembly: the temporary file goes, the units stay
        if checked.directory:
            groups = _output_groups(source, sidecar)
            count = assemble_directory(out, groups, schema, metadata)
        else:
            unit_files = (sidecar.unit(u) for u in range(len(source)))
            count = assemble_file(out, checked.fmt, unit_files, schema, metadata)
        sidecar.remove()
    summary.total, summary.failed, summary.first_errors = count.rows, count.failed, count.first_errors
    summary.videos, summary.frame_rows, summary.frames_failed = count.videos, count.frame_rows, count.frames_failed
    summary.unit_errors = errors
    return summary


def _direct_units(source: Source) -> set[int]:
    """Units that are a whole `--out DIR/` file (a shard, a run of images), written there as they finish."""
    count: dict[str, list[int]] = {}
    for u in range(len(source)):
        count.setdefault(source.output_stem(u), []).append(u)
    return {units[0] for units in count.values() if len(units) == 1}


def _output_groups(source: Source, sidecar: Sidecar) -> dict[str, list[Path | None]]:
    """`--out DIR/`: each output stem with its units' sidecar files (None: the unit is in its output file)."""
    groups: dict[str, list[Path | None]] = {}
    for u in range(len(source)):
        path = sidecar.unit(u)
        groups.setdefault(source.output_stem(u), []).append(path if path.exists() else None)
    return groups


def _rows_in_directory(out: Path, source: Source, state: SidecarState) -> int:
    """Rows of finished units written straight to `--out DIR/` files (counted once per file)."""
    import pyarrow.parquet as pq

    stems = {source.output_stem(u) for u in state.finished.tolist()}
    total = 0
    for stem in stems:
        with contextlib.suppress(Exception):  # a file removed by hand: its rows are not counted
            total += pq.read_metadata(out / f"{stem}.parquet").num_rows
    return total


def _known_total(source: Source, mine: np.ndarray, starts: np.ndarray) -> int | None:
    rows = [source.rows(u) for u in mine.tolist()]
    return None if any(r < 0 for r in rows) else sum(rows) - int(starts.sum())


class _Counter(threading.Thread):
    """Counts the samples of units whose size only their headers tell (tar shards), then gives the progress bar
    its total; a daemon thread that reads headers only, and stops when the run ends first."""

    def __init__(self, source: Source, units: list[int], known: int, progress: ProgressBar):
        super().__init__(daemon=True, name="iqa-count")
        self.source, self.units, self.known, self.progress = source, units, known, progress
        self.stop = threading.Event()

    def run(self) -> None:
        total = self.known
        for u in self.units:
            if self.stop.is_set():
                return
            total += self.source.count_rows(u)
        if not self.stop.is_set():
            self.progress.set_total(total)


def _count_in_background(source: Source, mine: np.ndarray, starts: np.ndarray, progress: Any) -> _Counter | None:
    if not isinstance(progress, ProgressBar) or _known_total(source, mine, starts) is not None:
        return None
    unknown = [u for u in mine.tolist() if source.rows(u) < 0]
    known = sum(source.rows(u) for u in mine.tolist() if source.rows(u) >= 0) - int(starts.sum())
    counter = _Counter(source, unknown, known, progress)
    counter.start()
    return counter


def _wait_for_ranks(sidecar: Sidecar, environment, processed: int, seconds: float) -> list[tuple[int, float]]:
    """(images, seconds) of every rank, rank 0 waiting for the others through the shared file system.

    Not a collective: with static assignment a rank may finish hours before the slowest one, longer than any
    process-group timeout. Each rank writes `rank-<r>.json` when its units are written and exits; rank 0
    polls for all of them (torchrun ends the launch if a rank dies, so the wait is bounded by the launch).
    """
    if not environment.is_distributed:
        return [(processed, seconds)]
    report = sidecar.rank_report(environment.rank)
    atomic_write(report, json.dumps({"processed": processed, "seconds": seconds}).encode())
    if not environment.is_main:
        return [(processed, seconds)]
    paths = [sidecar.rank_report(r) for r in range(environment.world_size)]
    while not all(path.exists() for path in paths):
        time.sleep(0.5)
    reports = [json.loads(path.read_text()) for path in paths]
    return [(r["processed"], r["seconds"]) for r in reports]
