"""`iqa score` over WebDataset shards and Parquet image columns: the unit of work is a shard or a row group.

The same pipeline as loose images (`iqa_cli.scoring.pipeline`: decode and the backbone's transform in
DataLoader workers, batches of one fixed shape, `BatchRunner`, the CUDA copy stream, signals, the run lock,
the manifest checks); what differs is the bookkeeping, because listing a dataset of 100M images must not
read them and its record of progress must not hold 100M indices:

- Each rank takes a strided share of the units not yet finished (`units[rank::world]`); its DataLoader
  workers take strided shares of those and stream them (tar in order, one Parquet row group at a time),
  building whole batches; a batch says which units ended in it.
- A finished unit is written at once, atomically, as `OUT.parts/unit-<u>.parquet` (single-file output) or
  straight as `OUT/<shard>.parquet` plus a `unit-<u>.done` marker (directory output, one file per shard).
  A unit in flight when the run dies leaves nothing and is redone; a finished one is never scored again.
  Parquet files of several row groups are assembled into `OUT/<file>.parquet` at the end.
- A shard that breaks off (truncated, corrupt tar) is an error of its unit, kept in `unit-<u>.error`,
  reported at the end; the rows read before the break are scored, and the run goes on.

Stragglers: assignment is static, so the slowest rank sets the end; a rank that finishes early waits at the
final barrier. A rerun (same command, any world size) hands out only the units still missing.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from iqa_cli import distributed
from iqa_cli.errors import UserError
from iqa_cli.files import atomic_write, fsync_dir
from iqa_cli.paths import check_output_dir, check_output_file
from iqa_cli.scoring import pipeline
from iqa_cli.scoring.store import (
    DIRECTORY_METADATA,
    Sidecar,
    output_format,
    suffix_mismatch,
    unit_schema,
    unit_table,
    write_output,
    write_table_atomic,
)
from iqa_cli.sources import UnitList, find_units
from iqa_cli.sources.webdataset import ShardError


def _part(sidecar: Sidecar, u: int, suffix: str) -> Path:
    return sidecar.dir / f"unit-{u:08d}.{suffix}"


class UnitBatches(torch.utils.data.IterableDataset):
    """Streams units and yields whole batches of `collate.batch_size` rows (the last one padded).

    Besides `PadCollate`'s fields a batch has `unit` (int64 [B], -1 for padding), `name` and `keep` per row,
    and `done`: [(unit, error or None)] of the units whose last row is in this batch or before it.
    """

    def __init__(self, units: UnitList, unit_ids: np.ndarray, transform: Callable, collate: Callable, load=None):
        self.units, self.unit_ids = units, unit_ids
        self.transform, self.collate, self.load = transform, collate, load

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.unit_ids if info is None else self.unit_ids[info.id :: info.num_workers]
        load = self.load or pipeline._default_loader()
        items: list[tuple] = []
        done: list[tuple[int, str | None]] = []
        for u in mine.tolist():
            error = None
            try:
                for name, data, failure, kept in self.units.samples(u):
                    items.append(self._item(u, name, data, failure, kept, load))
                    if len(items) == self.collate.batch_size:
                        yield self._batch(items, done)
                        items, done = [], []
            except ShardError as exc:
                error = str(exc)
            except Exception as exc:  # a file that vanished or broke after listing: its unit's error
                error = pipeline._reason(exc)
            done.append((u, error))
        if items or done:
            yield self._batch(items, done)

    def _item(self, u: int, name: str, data: bytes | None, failure: str | None, kept: dict, load: Callable):
        width = height = -1
        if failure is None:
            try:
                image = load(io.BytesIO(data))
                width, height = image.size
                return u, name, kept, (0, self.transform(image), width, height, None)
            except Exception as exc:
                failure = pipeline._reason(exc)
        return u, name, kept, (0, None, width, height, failure)

    def _batch(self, items: list[tuple], done: list) -> dict[str, Any]:
        batch = self.collate([item[3] for item in items])
        unit = torch.full((self.collate.batch_size,), -1, dtype=torch.int64)
        unit[: len(items)] = torch.tensor([item[0] for item in items], dtype=torch.int64)
        batch["index"] = unit.clone()
        batch["unit"] = unit
        batch["name"] = [item[1] for item in items]
        batch["keep"] = [item[2] for item in items]
        batch["done"] = done
        return batch


class UnitWriter:
    """Collects each unit's rows in the main process and writes the unit when its end arrives."""

    def __init__(self, units: UnitList, sidecar: Sidecar, out: Path, directory: bool, plan: Any, metadata: dict):
        self.units, self.sidecar, self.out, self.directory = units, sidecar, out, directory
        self.level_names = plan.level_names
        self.schema = unit_schema(len(plan.level_names), plan.has_regressor, units.keep_types)
        self.schema_with_metadata = self.schema.with_metadata(metadata)
        self.pending: dict[int, dict[str, list]] = {}

    def _rows(self, u: int) -> dict[str, list]:
        if u not in self.pending:
            keys = ("image", "score", "std", "probs", "width", "height", "error", "score_reg", "shard")
            self.pending[u] = {k: [] for k in keys} | {"keep": {c: [] for c in self.units.keep}}
        return self.pending[u]

    def add(self, batch: dict[str, Any], result: Any) -> int:
        units = batch["unit"].tolist()
        n = 0
        for row, u in enumerate(units):
            if u < 0:
                continue
            n += 1
            rows = self._rows(u)
            error = batch["error"][row]
            rows["image"].append(batch["name"][row])
            rows["shard"].append(self.units.files[int(self.units.file_of[u])].path)
            rows["width"].append(int(batch["width"][row]))
            rows["height"].append(int(batch["height"][row]))
            rows["error"].append(error)
            ok = error is None
            rows["probs"].append(result.probs[row] if ok else None)
            rows["score"].append(float(result.score[row]) if ok else 0.0)
            rows["std"].append(float(result.std[row]) if ok else 0.0)
            rows["score_reg"].append(float(result.score_reg[row]) if ok and result.score_reg is not None else 0.0)
            for column in self.units.keep:
                rows["keep"][column].append(batch["keep"][row].get(column))
        for u, error in batch["done"]:
            self.finish(u, error)
        return n

    def finish(self, u: int, error: str | None) -> None:
        table = unit_table(self.pending.pop(u, None) or self._empty(), self.level_names, self.schema)
        table = table.replace_schema_metadata(self.schema_with_metadata.metadata)
        if error is not None:  # reported at the end of this run or of the one that resumes it
            atomic_write(_part(self.sidecar, u, "error"), error.encode())
        f = int(self.units.file_of[u])
        if self.directory and len(self.units.units_of_file(f)) == 1:
            write_table_atomic(table, self.out / f"{self.units.files[f].stem}.parquet")
            atomic_write(_part(self.sidecar, u, "done"), b"")
        else:
            write_table_atomic(table, _part(self.sidecar, u, "parquet"))

    def _empty(self) -> dict[str, list]:
        rows = self._rows(-1)
        del self.pending[-1]
        return rows


def done_units(sidecar: Sidecar, n: int) -> np.ndarray:
    """Units finished by earlier runs: a readable part, or a `.done` marker (directory output)."""
    done = []
    for path in sidecar.dir.glob("unit-*"):
        stem, _, suffix = path.name.partition(".")
        if suffix not in ("parquet", "done"):
            continue
        u = int(stem.removeprefix("unit-"))
        if suffix == "parquet":
            try:
                pq.read_metadata(path)
            except Exception:
                path.unlink(missing_ok=True)
                continue
        if u < n:
            done.append(u)
    return np.unique(np.asarray(done, dtype=np.int64))


def unit_errors(sidecar: Sidecar, units: UnitList) -> list[tuple[str, str]]:
    errors = []
    for path in sorted(sidecar.dir.glob("unit-*.error")):
        u = int(path.name.partition(".")[0].removeprefix("unit-"))
        if u < len(units):
            errors.append((units.label(u), path.read_text(errors="replace")))
    return errors


def score_units(
    config: pipeline.ScoreConfig,
    *,
    scorer_factory: Callable[[torch.device], pipeline.ScorerLike] | None = None,
    load_image: Callable | None = None,
    console: Any = None,
) -> pipeline.ScoreSummary:
    """`pipeline.score_images` for shard and Parquet inputs (it hands them here); the same contract."""
    out = Path(config.out)
    directory = config.out_dir or out.is_dir()
    if directory:
        if config.format not in (None, "parquet"):
            raise UserError(f"--format {config.format}: --out {out}/ writes one Parquet file per input shard")
        fmt = "parquet"
        check_output_dir(out, "--out")
    else:
        fmt = output_format(out, config.format)
        check_output_file(out, "--out", example="scores.parquet")
    batch_size = pipeline.parse_batch_size(config.batch_size)
    if config.workers is not None and config.workers < 0:
        raise UserError(f"--workers {config.workers}: use 0 (decode in the main process) or more")
    if config.dtype not in pipeline.DTYPES:
        raise UserError(f"--dtype {config.dtype}: use one of {', '.join(pipeline.DTYPES)}")
    if not pipeline.is_dataset_input(config.inputs, config.from_file, config.image_col):
        raise UserError(f"--out {out}/ writes one Parquet file per input shard; loose images go to one file")
    return pipeline.locked_run(
        config,
        console,
        lambda device, environment, console: _score_units(
            config, fmt, directory, batch_size, device, environment, scorer_factory, load_image, console
        ),
    )


def _plan_units(config, fmt, directory, units, fingerprint, scorer) -> pipeline._Plan:
    """`pipeline._plan` (resume, complete, refuse, start), with a directory output's `_iqa.json` as its footer."""
    out = Path(config.out)
    if not directory:
        return pipeline._plan(config, fmt, units, fingerprint, scorer)
    if config.overwrite:  # the folder's footer and an interrupted run's sidecar go; its files are handled below
        (out / DIRECTORY_METADATA).unlink(missing_ok=True)
        Sidecar(out).remove()
    if Sidecar(out).read_manifest() is not None or (out / DIRECTORY_METADATA).exists():
        return pipeline._plan(config, fmt, units, fingerprint, scorer)  # resume, complete, or refuse
    ours = [out / f"{f.stem}.parquet" for f in units.files]
    clash = [p for p in ours if p.exists()]
    if clash and not config.overwrite:
        raise UserError(f"{out} already holds {clash[0].name} and was not finished by `iqa score`; pass --overwrite")
    others = _other_parquet_files(out, set(ours))
    if others and not config.overwrite:
        raise UserError(
            f"{out} holds {others[0].name} (of {len(others)} Parquet file(s) for other inputs), which a reader of "
            "the folder would take as rows of this output; pass --overwrite to remove them, or choose another folder"
        )
    for path in clash + others:
        path.unlink()
    return pipeline.start_run(Sidecar(out), pipeline._request(config), fingerprint, len(units), scorer)


def _other_parquet_files(out: Path, ours: set[Path]) -> list[Path]:
    """The Parquet files in the output folder that this run will not write; `iqa score` files of an earlier run
    over other shards. A file `iqa score` did not write is refused in one line, even with --overwrite (it may
    be data of the user's: not ours to delete)."""
    if not out.is_dir():
        return []
    others = sorted(p for p in out.glob("*.parquet") if p not in ours)
    for path in others:
        try:
            written_by_us = b"inputs_fingerprint" in (pq.read_schema(path).metadata or {})
        except Exception:
            written_by_us = False
        if not written_by_us:
            raise UserError(
                f"{out} holds {path.name}, which `iqa score` did not write: a folder output holds only the files "
                "of its inputs; choose another folder or move it"
            )
    return others


def _score_units(config, fmt, directory, batch_size, device, environment, scorer_factory, load_image, console):
    out = Path(config.out)
    show = not config.quiet and environment.is_main
    units = find_units(config.inputs, from_file=config.from_file, image_col=config.image_col, keep=config.keep)
    fingerprint = units.fingerprint()
    if len(set(distributed.all_gather_object(fingerprint))) != 1:
        raise UserError("the ranks found different lists of shards; every rank must see the same files")
    summary = pipeline.ScoreSummary(out=out, is_main=environment.is_main, warnings=list(units.warnings))
    if not directory and config.format is not None and (note := suffix_mismatch(out, fmt)):
        summary.warnings.insert(0, note)
    scorer = pipeline._LazyScorer(lambda: pipeline.build_scorer(config, device, scorer_factory))
    plan = pipeline._decide_on_main(
        lambda: _plan_units(config, fmt, directory, units, fingerprint, scorer), environment
    )
    if plan.status == "complete":
        summary.already_complete = True
        summary.total = _recorded_rows(out, fmt)
        return summary

    sidecar = Sidecar(out)
    if environment.is_main:  # reports of an earlier launch's ranks; the gather below keeps ranks in step
        for stale in sidecar.dir.glob("rank-*.json"):
            stale.unlink(missing_ok=True)
    done = done_units(sidecar, len(units))
    if len(set(distributed.all_gather_object(len(done)))) != 1:
        raise UserError(f"the ranks see different files in {sidecar.dir}; --out must be on a shared file system")
    remaining = np.setdiff1d(np.arange(len(units), dtype=np.int64), done)
    mine = remaining[distributed.shard(len(remaining), environment)]
    summary.resumed = len(done)
    if show and len(done):
        console.print(f"resuming: {len(done)} of {len(units)} units already scored in {sidecar.dir}", markup=False)
    if directory:
        out.mkdir(parents=True, exist_ok=True)
    metadata = pipeline.output_metadata(plan, pipeline._request(config), fingerprint, len(units))
    model = scorer.get() if len(mine) else None
    start = time.monotonic()
    processed = 0
    if model is not None:
        processed = _run(
            model,
            units,
            mine,
            sidecar,
            plan,
            metadata,
            config,
            batch_size,
            environment,
            load_image,
            console if show else None,
            directory,
        )
    seconds = time.monotonic() - start
    gathered = _wait_for_ranks(sidecar, environment, processed, seconds)
    summary.processed_by_rank = [n for n, _ in gathered]
    summary.processed = sum(summary.processed_by_rank)
    summary.seconds = max(s for _, s in gathered)
    if not environment.is_main:
        return summary

    schema = unit_schema(len(plan.level_names), plan.has_regressor, units.keep_types)
    errors = unit_errors(sidecar, units)
    metadata = {**metadata, "unit_errors": json.dumps(errors)}
    with pipeline._signals_raise(sidecar.dir):
        if directory:
            rows, failed, first = _assemble_directory(units, sidecar, out, schema.with_metadata(metadata))
            atomic_write(out / DIRECTORY_METADATA, json.dumps(metadata, indent=1, sort_keys=True).encode())
        else:
            parts = (pq.ParquetFile(_part(sidecar, u, "parquet")).read() for u in range(len(units)))
            rows, failed, first = write_output(out, fmt, parts, schema, metadata)
        sidecar.remove()
    summary.total, summary.failed, summary.first_errors = rows, failed, first
    summary.unit_errors = errors
    return summary


def _wait_for_ranks(sidecar: Sidecar, environment, processed: int, seconds: float) -> list[tuple[int, float]]:
    """(images, seconds) of every rank, rank 0 waiting for the others through the shared file system.

    Not a collective: with static assignment a rank may finish hours before the slowest one, longer than any
    process-group timeout. Each rank writes `rank-<r>.json` when its units are written and exits; rank 0
    polls for all of them (torchrun ends the launch if a rank dies, so the wait is bounded by the launch).
    """
    if not environment.is_distributed:
        return [(processed, seconds)]
    report = sidecar.dir / f"rank-{environment.rank:05d}.json"
    atomic_write(report, json.dumps({"processed": processed, "seconds": seconds}).encode())
    if not environment.is_main:
        return [(processed, seconds)]
    paths = [sidecar.dir / f"rank-{r:05d}.json" for r in range(environment.world_size)]
    while not all(path.exists() for path in paths):
        time.sleep(0.5)
    reports = [json.loads(path.read_text()) for path in paths]
    return [(r["processed"], r["seconds"]) for r in reports]


def _run(scorer, units, mine, sidecar, plan, metadata, config, batch_size, environment, load_image, console, directory):
    """The hot loop of one rank: unit loader -> device -> model -> one part per finished unit."""
    device = torch.device(scorer.device)
    size = batch_size or pipeline.AUTO_BATCH["cuda" if device.type == "cuda" else "cpu"]
    known = units.rows[mine]
    if (known >= 0).all():
        size = max(1, min(size, int(known.sum())))
    workers = pipeline.default_workers(environment) if config.workers is None else config.workers
    workers = min(workers, len(mine))
    pool = pipeline.batch_pool(workers, pipeline.PREFETCH)
    collate = pipeline.PadCollate(size, scorer.collate, pipeline._transfer_dtype(scorer), pool)
    transform, load_image = pipeline.decoding(scorer, config, load_image)
    dataset = UnitBatches(units, mine, transform, collate, load_image)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=pipeline._worker_init if workers else None,
        prefetch_factor=pipeline.PREFETCH if workers else None,
    )
    runner = pipeline.BatchRunner(scorer, size, auto=batch_size is None and device.type == "cuda")
    writer = UnitWriter(units, sidecar, Path(config.out), directory, plan, metadata)
    batches = iter(loader)
    total = int(known.sum()) if (known >= 0).all() else None
    progress = pipeline._progress(console, total, environment)
    processed = 0
    try:
        threads = pipeline.model_threads(device, workers, environment, torch.get_num_threads())
        with (
            pipeline._signals_raise(sidecar.dir),
            torch.inference_mode(),
            progress,
            pipeline._intra_op_threads(threads),
        ):
            for batch, visual in pipeline._device_batches(batches, device):
                real = batch["unit"] >= 0
                ok = real & torch.tensor([e is None for e in batch["error"]])
                result = runner(visual) if bool(ok.any()) else None
                n = writer.add(batch, result)
                if pool is not None:
                    pool.release(batch)
                processed += n
                progress.advance(n)
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of GPU memory at --batch-size {runner.size}; use a smaller size or --batch-size auto"
        ) from None
    finally:
        del batches
    return processed


def _assemble_directory(units: UnitList, sidecar: Sidecar, out: Path, schema: pa.Schema):
    """Writes each Parquet input of several row groups as one `OUT/<file>.parquet`; counts rows of every file."""
    rows = failed = 0
    first: list[tuple[str, str]] = []
    for f, source in enumerate(units.files):
        path = out / f"{source.stem}.parquet"
        members = units.units_of_file(f)
        assembled = all(_part(sidecar, int(u), "done").exists() for u in members)
        if len(members) == 0 or (len(members) > 1 and not assembled):  # an empty file: an empty output
            tables = [pq.ParquetFile(_part(sidecar, int(u), "parquet")).read() for u in members]
            table = pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()
            write_table_atomic(table.replace_schema_metadata(schema.metadata), path)
            for u in members:  # every marker before any part goes: a kill in between leaves parts or markers
                atomic_write(_part(sidecar, int(u), "done"), b"")
            for u in members:
                _part(sidecar, int(u), "parquet").unlink(missing_ok=True)
        table = pq.ParquetFile(path).read(columns=["image", "error"])
        errors = table.column("error")
        rows += table.num_rows
        failed += table.num_rows - errors.null_count
        if len(first) < 5 and errors.null_count < table.num_rows:
            pairs = zip(table.column("image").to_pylist(), errors.to_pylist(), strict=True)
            first += [(n, e) for n, e in pairs if e is not None][: 5 - len(first)]
    fsync_dir(out)
    return rows, failed, first


def _recorded_rows(out: Path, fmt: str) -> int:
    try:
        if out.is_dir():
            return sum(pq.read_metadata(p).num_rows for p in out.glob("*.parquet"))
        if fmt == "parquet":
            return pq.read_metadata(out).num_rows
    except Exception:
        pass
    return 0
