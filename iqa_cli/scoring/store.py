"""What a scoring run keeps on disk while it runs: the sidecar folder next to the output, and the writer of its units.

`OUT.parts/` (the sidecar) holds:
- `manifest.json`: what the run scores and with what (model, prompt, inputs' fingerprint), written before
  anything else; a rerun resumes only when it matches;
- `unit-<u>.parquet`: the rows of finished unit u, in the unit's order; or, for `--out DIR/` outputs whose unit
  is a whole output file, the file itself in `DIR/` and a `unit-<u>.done` marker here;
- `unit-<u>.from-<start>.parquet`: a piece of unfinished unit u, its samples from `start` on. A unit that takes
  longer than `flush_seconds` (a 7B model on a CPU) is written in pieces, so a kill loses at most that much;
  pieces chain from sample 0, and a rerun resumes the unit after the last piece. A piece holds whole samples: a
  video's `--per-frame` rows are never split from its own row, and a piece whose samples have several rows
  records its sample count in its footer (`iqa_samples`);
- `unit-<u>.error`: why unit u broke off (a truncated shard), reported at the end;
- `rank-<r>.json`: a torchrun rank's report when its units are written.

Every file is written to a temporary name and renamed, so it is complete or absent; a file whose Parquet footer
cannot be read (a power loss before the data reached the disk) is deleted when the next run starts and its rows
are scored again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iqa_cli.files import atomic_write, fsync_dir
from iqa_cli.scoring.config import MANIFEST
from iqa_cli.scoring.output import rows_table, write_table_atomic

SAMPLES_KEY = b"iqa_samples"  # a piece's footer: samples it holds, when its rows are more (--per-frame)
MANIFEST_VERSION = 2  # 1: the files loop's index-keyed parts (iqa < 0.2); 2: units for every source
_UNIT_FILE = re.compile(r"unit-(\d{8})(?:\.from-(\d{10}))?\.(parquet|done|error)")


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


@dataclass
class SidecarState:
    """What earlier runs finished: units whose rows are all written, and how far each unfinished unit got."""

    finished: np.ndarray  # int64, sorted
    starts: dict[int, int] = field(default_factory=dict)  # unfinished unit -> rows already in its pieces
    rows: int = 0  # rows in finished units' sidecar files and in pieces (not counting `--out DIR/` files)


class Sidecar:
    """The folder of unit files and the manifest next to the output."""

    def __init__(self, out: Path):
        self.dir = sidecar_path(out)

    def exists(self) -> bool:
        return self.dir.is_dir()

    def read_manifest(self) -> dict | None:
        try:
            return json.loads((self.dir / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def create(self, manifest: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())

    def remove(self) -> None:
        """Deletes our files, the manifest first: a removal cut short leaves a folder that reads as no run."""
        if not self.dir.is_dir():
            return
        (self.dir / MANIFEST).unlink(missing_ok=True)
        for pattern in ("unit-*", "part-*.parquet", "rank-*.json", "*.tmp"):
            for path in self.dir.glob(pattern):
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a file that is not ours stays, and so does the folder
            self.dir.rmdir()
        fsync_dir(self.dir.parent)

    def unit(self, u: int, suffix: str = "parquet") -> Path:
        return self.dir / f"unit-{u:08d}.{suffix}"

    def piece(self, u: int, start: int) -> Path:
        return self.dir / f"unit-{u:08d}.from-{start:010d}.parquet"

    def pieces(self, u: int) -> list[Path]:
        return sorted(self.dir.glob(f"unit-{u:08d}.from-*.parquet"))

    def rank_report(self, rank: int) -> Path:
        return self.dir / f"rank-{rank:05d}.json"

    def scan(self, num_units: int, *, clean: bool) -> SidecarState:
        """Finished units and the start of each unfinished one. With `clean` (rank 0, before the ranks read it):
        deletes temporaries, rank reports, files whose footer cannot be read, pieces of finished units and pieces
        that do not chain from row 0."""
        drop: list[Path] = []
        finished: set[int] = set()
        pieces: dict[int, list[tuple[int, Path]]] = {}
        for entry in os.scandir(self.dir) if self.dir.is_dir() else ():
            path, match = Path(entry.path), _UNIT_FILE.fullmatch(entry.name)
            if entry.name.endswith(".tmp") or entry.name.startswith("rank-"):
                drop.append(path)
            if match is None or int(match.group(1)) >= num_units:
                continue
            u, start, suffix = int(match.group(1)), match.group(2), match.group(3)
            if suffix == "done" or (suffix == "parquet" and start is None):
                finished.add(u)
            elif suffix == "parquet":
                pieces.setdefault(u, []).append((int(start), path))
        rows = 0
        for u in sorted(finished):
            path = self.unit(u)
            if path.exists():
                count = _footer_rows(path)
                if count is None:
                    finished.discard(u)
                    drop.append(path)
                else:
                    rows += count
        starts: dict[int, int] = {}
        for u, found in pieces.items():
            if u in finished:
                drop += [p for _, p in found]
                continue
            end = 0
            for start, path in sorted(found):
                count = _footer_samples(path) if start == end else None
                if count is None:  # unreadable, or after a gap: its rows are scored again
                    drop.append(path)
                    continue
                end += count
            if end:
                starts[u] = end
                rows += end
        if clean:
            for path in drop:
                path.unlink(missing_ok=True)
        return SidecarState(np.asarray(sorted(finished), dtype=np.int64), starts, rows)

    def errors(self, label: Callable[[int], str], num_units: int) -> list[tuple[str, str]]:
        """(unit label, error) of the units that broke off, in unit order."""
        found = []
        for path in sorted(self.dir.glob("unit-*.error")):
            u = int(path.name[5:13])
            if u < num_units:
                found.append((label(u), path.read_text(errors="replace")))
        return found


def _footer_rows(path: Path) -> int | None:
    try:
        return pq.read_metadata(path).num_rows
    except Exception:
        return None


def _footer_samples(path: Path) -> int | None:
    """Samples of a piece: its recorded count, else its rows (one row per sample)."""
    try:
        meta = pq.read_metadata(path)
    except Exception:
        return None
    recorded = (meta.metadata or {}).get(SAMPLES_KEY)
    return int(recorded) if recorded is not None else meta.num_rows


@dataclass
class _Pending:
    """The rows of one unit the writer holds: `written` samples are already in pieces, then `chunks` hold `rows`
    rows of `samples` whole samples (and maybe the first rows of one more)."""

    written: int
    chunks: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    samples: int = 0


class UnitWriter:
    """Collects each unit's rows in the main process; writes a unit atomically when its end arrives, and the rows
    of unfinished units as pieces when `flush_seconds` have passed or they reach `flush_rows`.

    Args:
        source: the run's `iqa_cli.sources.Source` (output stems, extra columns).
        schema: the output schema with the run's metadata.
        level_names: ascending quality; `level` is the name of the most likely one.
        directory: `--out DIR/`: units that are a whole output file (`direct`) are written there.
        starts: rows of each unit already in pieces (a resumed run).
        flush_rows, flush_seconds: `ScoreConfig`'s.
    """

    def __init__(
        self,
        source: Any,
        sidecar: Sidecar,
        schema: pa.Schema,
        level_names: list[str],
        *,
        directory: Path | None = None,
        direct: set[int] = frozenset(),
        starts: dict[int, int] | None = None,
        flush_rows: int,
        flush_seconds: float,
    ):
        self.source, self.sidecar, self.schema, self.level_names = source, sidecar, schema, list(level_names)
        self.directory, self.direct = directory, direct
        self.starts = dict(starts or {})
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.pending: dict[int, _Pending] = {}
        self.last_flush = time.monotonic()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in a Ray actor, maybe on another machine: `time.monotonic()` counts from that machine's boot,
        so the driver's `last_flush` means nothing there; the clock starts again."""
        self.__dict__.update(state)
        self.last_flush = time.monotonic()

    def add(self, batch: dict[str, Any], result: Any) -> int:
        """Keeps the real rows of one batch, writes the units that ended in it; returns how many rows it had."""
        units = batch["unit"].numpy()
        real = np.flatnonzero(units >= 0)
        for u in dict.fromkeys(units[real].tolist()):
            at = real[units[real] == u]
            pending = self.pending.get(u)
            if pending is None:
                pending = self.pending[u] = _Pending(self.starts.get(u, 0))
            first = int(batch["row"][at[0]])
            if first != pending.written + pending.samples:  # the loader streams each unit in order, once
                raise RuntimeError(f"unit {u}: row {first} arrived, {pending.written + pending.samples} expected")
            chunk = _chunk(batch, result, at)
            pending.chunks.append(chunk)
            pending.rows += len(at)
            pending.samples += int(chunk["last"].sum())
        for u, error in batch["done"]:
            self._finish(u, error)
        if time.monotonic() - self.last_flush >= self.flush_seconds or self._unfinished_rows() >= self.flush_rows:
            self.flush()
        return len(real)

    def _unfinished_rows(self) -> int:
        return sum(p.rows for p in self.pending.values())

    def flush(self) -> None:
        """Writes the held whole samples of every unfinished unit as a piece (at the end of a run cut short, too);
        the rows of a sample whose last row has not arrived stay held."""
        self.last_flush = time.monotonic()
        for u, pending in self.pending.items():
            if not pending.samples:
                continue
            rows = _joined(pending.chunks)
            cut = int(np.flatnonzero(rows["last"])[-1]) + 1
            table = self._table([_sliced(rows, slice(0, cut))])
            if cut != pending.samples:  # rows of single frames: the piece says how many samples it holds
                recorded = {**(table.schema.metadata or {}), SAMPLES_KEY: str(pending.samples)}
                table = table.replace_schema_metadata(recorded)
            write_table_atomic(table, self.sidecar.piece(u, pending.written))
            pending.written += pending.samples
            rest = _sliced(rows, slice(cut, None))
            pending.rows, pending.samples = len(rest["error"]), 0
            pending.chunks = [rest] if pending.rows else []

    def _finish(self, u: int, error: str | None) -> None:
        pending = self.pending.pop(u, None) or _Pending(self.starts.get(u, 0))
        pieces = self.sidecar.pieces(u)
        tables = [pq.ParquetFile(p).read() for p in pieces]
        table = self._table(pending.chunks)
        if tables:
            table = pa.concat_tables([*[t.cast(self.schema) for t in tables], table])
        if error is not None:  # reported at the end of this run or of the one that resumes it
            atomic_write(self.sidecar.unit(u, "error"), error.encode())
        else:  # an earlier run's error of this unit (a shard since repaired)
            self.sidecar.unit(u, "error").unlink(missing_ok=True)
        if self.directory is not None and u in self.direct:
            write_table_atomic(table, self.directory / f"{self.source.output_stem(u)}.parquet")
            atomic_write(self.sidecar.unit(u, "done"), b"")
        else:
            write_table_atomic(table, self.sidecar.unit(u))
        for path in pieces:
            path.unlink(missing_ok=True)

    def _table(self, chunks: list[dict[str, Any]]) -> pa.Table:
        return rows_table(chunks, self.level_names, self.schema, self.source.columns)


def _chunk(batch: dict[str, Any], result: Any, at: np.ndarray) -> dict[str, Any]:
    """Rows `at` of a batch (one unit's) as numpy arrays and lists; scores of failed rows are ignored later."""
    chunk = {
        "image": [batch["name"][i] for i in at],
        "width": batch["width"].numpy()[at],
        "height": batch["height"].numpy()[at],
        "error": [batch["error"][i] for i in at],
        "kept": [batch["kept"][i] for i in at],
        "last": batch["last"].numpy()[at] if "last" in batch else np.ones(len(at), dtype=bool),
    }
    for name in ("frames", "duration", "fps", "frame"):
        if name in batch:
            chunk[name] = batch[name].numpy()[at]
    n = len(at)
    if result is None:  # every row of the batch failed: no model call
        chunk.update(probs=None, score=np.zeros(n, np.float32), std=np.zeros(n, np.float32), score_reg=None)
        chunk.update(score_soft=None, texts=None)
    else:
        texts = None  # the generated text of the rows the model saw (the others failed before it: no text)
        if result.texts is not None:
            texts = [result.texts[i] if batch["error"][i] is None else None for i in at]
        chunk.update(
            probs=result.probs[at],
            score=result.score[at],
            std=result.std[at],
            score_reg=None if result.score_reg is None else result.score_reg[at],
            score_soft=None if result.score_soft is None else result.score_soft[at],
            texts=texts,
        )
        if result.errors is not None:  # a reasoning model's answer without a number is an error row too
            chunk["error"] = [chunk["error"][j] or result.errors[i] for j, i in enumerate(at)]
    return chunk


def _joined(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Chunks as one (arrays concatenated, lists joined; a missing array of scores filled in)."""
    if len(chunks) == 1:
        return chunks[0]
    n = [len(c["error"]) for c in chunks]
    joined: dict[str, Any] = {}
    for key in chunks[0]:
        parts = [c.get(key) for c in chunks]
        if any(isinstance(p, list) for p in parts):  # a batch that failed whole has no texts: None per row
            joined[key] = [v for p, m in zip(parts, n, strict=True) for v in (p if p is not None else [None] * m)]
        elif all(p is None for p in parts):
            joined[key] = None
        else:
            like = next(p for p in parts if p is not None)
            filled = [
                p if p is not None else np.zeros((m, *like.shape[1:]), like.dtype)
                for p, m in zip(parts, n, strict=True)
            ]
            joined[key] = np.concatenate(filled)
    return joined


def _sliced(chunk: dict[str, Any], rows: slice) -> dict[str, Any]:
    return {key: None if value is None else value[rows] for key, value in chunk.items()}
