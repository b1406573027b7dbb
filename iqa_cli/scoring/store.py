"""What a scoring run keeps on disk: the sidecar of parts, the streaming merge, the output file.

A part is a small Parquet file of finished rows, each carrying its input index, written to a temporary
name, fsynced and renamed, so it is either complete or absent. `merge_parts` reads the parts of every
writer (one rank of one run: increasing indices) as a k-way merge, so the final file is written in input
order with one part per writer in memory. See `iqa_cli.scoring.pipeline` for how a run uses them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iqa_cli.errors import UserError
from iqa_cli.files import atomic_write, fsync_dir, fsync_file
from iqa_cli.inputs import InputList

FORMATS = ("parquet", "csv", "jsonl")
SUFFIX_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
OUTPUT_ROW_GROUP = 65536
DIRECTORY_METADATA = "_iqa.json"  # --out DIR/: what a single-file output keeps in its footer (readers skip `_*`)


@dataclass
class BatchResult:
    """numpy results for B rows: probs [B, K] float32, score/std [B], score_reg [B] or None."""

    probs: np.ndarray
    score: np.ndarray
    std: np.ndarray
    score_reg: np.ndarray | None


def output_format(out: Path, fmt: str | None) -> str:
    """The format named by --format, else by the suffix of `out`; an unknown suffix is refused."""
    if fmt is None:
        suffix = out.suffix.lower()
        if suffix not in SUFFIX_FORMATS:
            what = f"unknown suffix {out.suffix!r}" if out.suffix else "no suffix to tell the format"
            raise UserError(
                f"--out {out}: {what} (use {', '.join(SUFFIX_FORMATS)}, or name the format with --format "
                f"{'|'.join(FORMATS)})"
            )
        return SUFFIX_FORMATS[suffix]
    if fmt.lower() not in FORMATS:
        raise UserError(f"--format {fmt}: unknown format (use one of {', '.join(FORMATS)})")
    return fmt.lower()


def suffix_mismatch(out: Path, fmt: str) -> str | None:
    """A warning when --format writes something other than what the suffix of `out` says."""
    implied = SUFFIX_FORMATS.get(out.suffix.lower())
    if implied == fmt:
        return None
    suffix = f"suffix {out.suffix!r}" if out.suffix else "no suffix"
    return f"--out {out.name} has {suffix} but holds {fmt} (--format {fmt})"


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def meta_path(out: Path) -> Path:
    """Where CSV/JSONL outputs keep the key-value metadata that Parquet stores in its footer."""
    return out.with_name(out.name + ".meta.json")


# ---------------------------------------------------------------------------------------------------
# Parts: the sidecar folder


def part_schema(num_levels: int, has_regressor: bool, *, with_index: bool) -> pa.Schema:
    fields = [("index", pa.int64())] if with_index else []
    fields += [
        ("image", pa.string()),
        ("score", pa.float32()),
        ("std", pa.float32()),
        ("probs", pa.list_(pa.float32())),
        ("level", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("error", pa.string()),
    ]
    if has_regressor:
        fields.append(("score_reg", pa.float32()))
    return pa.schema(fields)


class Sidecar:
    """The folder of parts and the manifest next to the output."""

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
        for pattern in ("part-*.parquet", "unit-*", "rank-*.json", "*.tmp"):
            for path in self.dir.glob(pattern):
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a file that is not ours stays, and so does the folder
            self.dir.rmdir()
        fsync_dir(self.dir.parent)

    def remove_temporaries(self) -> None:
        for path in self.dir.glob("*.tmp"):
            path.unlink(missing_ok=True)

    def part_paths(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))

    def done_indices(self) -> np.ndarray:
        """Sorted unique input indices already in parts; unreadable parts are deleted (work redone)."""
        chunks = [np.zeros(0, dtype=np.int64)]
        for path in self.part_paths():
            try:
                chunks.append(_index_values(pq.ParquetFile(path).read(columns=["index"])))
            except Exception:
                path.unlink(missing_ok=True)
        return np.unique(np.concatenate(chunks))

    def runs(self) -> list[list[Path]]:
        """Parts grouped by writer (one run of one rank), each group in the order it was written."""
        groups: dict[str, list[Path]] = {}
        for path in self.part_paths():
            writer, _, _ = path.stem.rpartition("-")
            groups.setdefault(writer, []).append(path)
        return [sorted(paths) for _, paths in sorted(groups.items())]


class PartWriter:
    """Buffers finished rows of one rank and writes them as atomic parts."""

    def __init__(
        self,
        sidecar: Sidecar,
        inputs: InputList,
        level_names: list[str],
        has_regressor: bool,
        *,
        rank: int,
        flush_rows: int,
        flush_seconds: float,
    ):
        self.sidecar = sidecar
        self.inputs = inputs
        self.level_names = np.array(level_names, dtype=object)
        self.has_regressor = has_regressor
        self.schema = part_schema(len(level_names), has_regressor, with_index=True)
        self.prefix = f"part-{time.time_ns():x}{uuid.uuid4().hex[:6]}-r{rank:05d}"
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.sequence = 0
        self.pending: list[dict[str, Any]] = []
        self.pending_rows = 0
        self.last_flush = time.monotonic()
        self.rows_written = 0

    def add(self, batch: dict, result: BatchResult) -> int:
        """Keeps the real rows of one batch; returns how many there were."""
        index = batch["index"].numpy()
        real = index >= 0
        errors = [e for e, keep in zip(batch["error"], real, strict=True) if keep]
        rows = {
            "index": index[real],
            "width": batch["width"].numpy()[real],
            "height": batch["height"].numpy()[real],
            "error": errors,
            "probs": result.probs[real],
            "score": result.score[real],
            "std": result.std[real],
            "score_reg": None if result.score_reg is None else result.score_reg[real],
        }
        n = int(real.sum())
        self.pending.append(rows)
        self.pending_rows += n
        if self.pending_rows >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()
        return n

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.pending_rows:
            return
        table = self._table()
        path = self.sidecar.dir / f"{self.prefix}-{self.sequence:08d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp, compression="zstd")
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        self.sequence += 1
        self.rows_written += self.pending_rows
        self.pending, self.pending_rows = [], 0

    def _table(self) -> pa.Table:
        """The pending rows as one table, from numpy without pyarrow's numpy path, which imports pandas
        (0.14 s) to look for categoricals."""
        cat = {key: np.concatenate([p[key] for p in self.pending]) for key in ("index", "width", "height", "score")}
        errors = [e for p in self.pending for e in p["error"]]
        failed = np.array([e is not None for e in errors], dtype=bool)
        probs = np.concatenate([p["probs"] for p in self.pending]).astype(np.float32)
        n, k = probs.shape
        levels = _numpy_array(probs.argmax(axis=1) if n else np.zeros(0, np.int64), pa.int64(), null=failed)
        columns = {
            "index": _numpy_array(cat["index"], pa.int64()),
            "image": _string_array(self.inputs.names.take(cat["index"])),
            "score": _numpy_array(cat["score"], pa.float32(), null=failed),
            "std": _numpy_array(np.concatenate([p["std"] for p in self.pending]), pa.float32(), null=failed),
            "probs": pa.ListArray.from_arrays(
                _numpy_array(np.arange(0, (n + 1) * k, k), pa.int32()),
                _numpy_array(probs.reshape(-1), pa.float32()),
                mask=_bool_array(failed),
            ),
            "level": _string_array(self.level_names.tolist()).take(levels),
            "width": _numpy_array(cat["width"], pa.int32(), null=cat["width"] < 0),
            "height": _numpy_array(cat["height"], pa.int32(), null=cat["height"] < 0),
            "error": _string_array(errors),
        }
        if self.has_regressor:
            reg = np.concatenate([p["score_reg"] for p in self.pending])
            columns["score_reg"] = _numpy_array(reg, pa.float32(), null=failed)
        return pa.table(columns, schema=self.schema)


_NUMPY_TYPES = {pa.int32(): np.int32, pa.int64(): np.int64, pa.float32(): np.float32}


def _numpy_array(values: np.ndarray, type: pa.DataType, *, null: np.ndarray | None = None) -> pa.Array:
    """`pa.array(values.astype(...), type, mask=null)` built from the buffers: the same array."""
    data = np.ascontiguousarray(values, dtype=_NUMPY_TYPES[type])
    if null is None or not null.any():
        return pa.Array.from_buffers(type, len(data), [None, pa.py_buffer(data)], null_count=0)
    valid = pa.py_buffer(np.packbits(~null, bitorder="little"))
    return pa.Array.from_buffers(type, len(data), [valid, pa.py_buffer(data)], null_count=int(null.sum()))


def _bool_array(values: np.ndarray) -> pa.Array:
    return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(np.packbits(values, bitorder="little"))])


def _string_array(values: list[str | None]) -> pa.Array:
    """Strings (None: null) from the buffers. File names with undecodable bytes (lone surrogates) get U+FFFD:
    UTF-8 cannot hold them."""
    data = [b"" if v is None else _utf8(v) for v in values]
    offsets = np.zeros(len(data) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    null = np.array([v is None for v in values], dtype=bool)
    valid = pa.py_buffer(np.packbits(~null, bitorder="little")) if null.any() else None
    buffers = [valid, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))]
    return pa.Array.from_buffers(pa.string(), len(data), buffers, null_count=int(null.sum()))


def _utf8(value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace").encode("utf-8")


# ---------------------------------------------------------------------------------------------------
# Merge and final output


def merge_parts(sidecar: Sidecar, num_inputs: int) -> Iterator[pa.Table]:
    """Yields the rows of all parts in input order, each index once; raises if any index is missing.

    Each writer's parts hold increasing indices, so rows up to the smallest "last index buffered" over
    all writers are final: emit them, refill the writers whose buffer ran dry, repeat.
    """
    readers = [iter(paths) for paths in sidecar.runs()]
    buffers: list[pa.Table | None] = [None] * len(readers)
    last_seen = [-1] * len(readers)
    expected = 0

    def refill(r: int) -> None:
        while buffers[r] is None or buffers[r].num_rows == 0:
            path = next(readers[r], None)
            if path is None:
                buffers[r] = None
                return
            table = pq.ParquetFile(path).read()  # read_table goes through pyarrow.dataset, which imports pandas
            table = table.take(pc_sort_indices(table))
            # One writer scores increasing indices, so a lower one is a row flushed twice (a signal
            # between a part's rename and the bookkeeping after it): drop it.
            table = table.filter(_bool_array(_index_values(table) > last_seen[r]))
            if table.num_rows:
                last_seen[r] = table.column("index")[-1].as_py()
            buffers[r] = table

    for r in range(len(readers)):
        refill(r)
    while any(b is not None for b in buffers):
        limit = min(b.column("index")[-1].as_py() for b in buffers if b is not None)
        ready = []
        for r, b in enumerate(buffers):
            if b is None:
                continue
            cut = int(np.searchsorted(_index_values(b), limit, side="right"))
            ready.append(b.slice(0, cut))
            buffers[r] = b.slice(cut)
            if buffers[r].num_rows == 0:
                refill(r)
        chunk = pa.concat_tables(ready)
        chunk = chunk.take(pc_sort_indices(chunk))
        index = _index_values(chunk)
        keep = np.ones(len(index), dtype=bool)
        keep[1:] = index[1:] != index[:-1]  # the same index twice (two runs raced on one sidecar)
        keep &= index >= expected
        chunk, index = chunk.filter(_bool_array(keep)), index[keep]
        if len(index) and not np.array_equal(index, np.arange(expected, expected + len(index))):
            missing = int(np.setdiff1d(np.arange(expected, index[-1] + 1), index)[0])
            raise RuntimeError(f"input {missing} has no row in {sidecar.dir}")
        expected += len(index)
        if len(index):
            yield chunk
    if expected != num_inputs:
        raise RuntimeError(f"{sidecar.dir} holds {expected} of {num_inputs} rows")


def _index_values(table: pa.Table) -> np.ndarray:
    """The (null-free int64) index column as numpy, read from its buffer: pyarrow's to_numpy imports pandas."""
    column = table.column("index").combine_chunks()
    if not len(column):
        return np.zeros(0, dtype=np.int64)
    return np.frombuffer(column.buffers()[1], dtype=np.int64, count=len(column), offset=column.offset * 8)


def pc_sort_indices(table: pa.Table) -> pa.Array:
    import pyarrow.compute as pc

    return pc.sort_indices(table, sort_keys=[("index", "ascending")])


def write_output(
    out: Path, fmt: str, chunks: Iterator[pa.Table], schema: pa.Schema, metadata: dict[str, str]
) -> tuple[int, int, list[tuple[str, str]]]:
    """Writes the merged rows to `out` atomically; returns (rows, failed rows, first few failures)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a merge that was killed
        stale.unlink(missing_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    rows = failed = 0
    first_errors: list[tuple[str, str]] = []
    schema = schema.with_metadata(metadata)
    try:
        with _OutputWriter(tmp, fmt, schema) as writer:
            for chunk in chunks:
                if "index" in chunk.column_names:
                    chunk = chunk.drop_columns(["index"])
                chunk = chunk.cast(schema)
                rows += chunk.num_rows
                errors = chunk.column("error")
                failed += chunk.num_rows - errors.null_count
                if len(first_errors) < 5 and errors.null_count < chunk.num_rows:
                    names, reasons = chunk.column("image").to_pylist(), errors.to_pylist()
                    first_errors += [(n, e) for n, e in zip(names, reasons, strict=True) if e is not None][:5]
                writer.write(chunk)
        fsync_file(tmp)
        if fmt != "parquet":
            atomic_write(meta_path(out), json.dumps(metadata, indent=1, sort_keys=True).encode())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return rows, failed, first_errors[:5]


class _OutputWriter:
    """One streaming writer per format; CSV holds probs as a JSON list, nulls as empty cells."""

    def __init__(self, path: Path, fmt: str, schema: pa.Schema):
        self.path, self.fmt, self.schema = path, fmt, schema
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.header = True

    def __enter__(self) -> _OutputWriter:
        if self.fmt == "parquet":
            self.parquet = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        else:
            self.file = open(self.path, "w", encoding="utf-8", newline="")
        return self

    def write(self, table: pa.Table) -> None:
        if self.fmt == "parquet":  # gather into row groups of a useful size
            self.pending.append(table)
            self.pending_rows += table.num_rows
            if self.pending_rows >= OUTPUT_ROW_GROUP:
                self._write_parquet()
        elif self.fmt == "csv":
            frame = _text_frame(table)
            frame.to_csv(self.file, header=self.header, index=False)
            self.header = False
        else:
            self.file.write(_jsonl(table))

    def _write_parquet(self) -> None:
        if self.pending:
            self.parquet.write_table(pa.concat_tables(self.pending), row_group_size=OUTPUT_ROW_GROUP)
        self.pending, self.pending_rows = [], 0

    def __exit__(self, *exc: Any) -> None:
        if self.fmt == "parquet":
            if exc[0] is None:
                self._write_parquet()
            self.parquet.close()
        else:
            self.file.close()


def _float_strings(column: pa.ChunkedArray) -> list[str | None]:
    """Shortest round-trip text of float32 values (numpy's repr), None for nulls."""
    values = column.to_numpy(zero_copy_only=False)
    valid = ~np.asarray(column.is_null())
    text = np.where(valid, np.nan_to_num(values.astype(np.float32)).astype(str), "")
    return [t if v else None for t, v in zip(text.tolist(), valid.tolist(), strict=True)]


def _probs_json(column: pa.ChunkedArray) -> list[str | None]:
    column = column.combine_chunks()
    valid = ~np.asarray(column.is_null())
    flat = column.flatten().to_numpy().astype(np.float32).astype(str)
    offsets = column.offsets.to_numpy()
    return [
        "[" + ", ".join(flat[offsets[i] : offsets[i + 1]]) + "]" if v else None for i, v in enumerate(valid.tolist())
    ]


def _text_frame(table: pa.Table) -> Any:
    import pandas as pd

    frame = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_floating(column.type):
            frame[name] = _float_strings(column)
        elif pa.types.is_list(column.type):
            frame[name] = _probs_json(column)
        elif pa.types.is_integer(column.type):
            frame[name] = pd.array(column.to_pylist(), dtype="Int32")
        else:
            frame[name] = column.to_pylist()
    return pd.DataFrame(frame)


def _jsonl(table: pa.Table) -> str:
    texts = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_floating(column.type):
            values = _float_strings(column)
        elif pa.types.is_list(column.type):
            values = _probs_json(column)
        else:
            values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in column.to_pylist()]
        texts[name] = [("null" if v is None else v) for v in values]
    keys = [json.dumps(name) for name in table.column_names]
    lines = [
        "{" + ", ".join(f"{k}: {texts[n][i]}" for k, n in zip(keys, table.column_names, strict=True)) + "}\n"
        for i in range(table.num_rows)
    ]
    return "".join(lines)


def read_output_metadata(out: Path, fmt: str) -> dict[str, str] | None:
    """The key-value metadata of an existing output, or None when it was not written by `iqa score`."""
    try:
        if out.is_dir():  # --out DIR/: the run's metadata is in DIR/_iqa.json
            metadata = json.loads((out / DIRECTORY_METADATA).read_text())
        elif fmt == "parquet":
            raw = pq.read_schema(out).metadata or {}
            metadata = {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW:")}
        else:
            metadata = json.loads(meta_path(out).read_text())
    except (OSError, ValueError, pa.ArrowException):
        return None
    return metadata if "inputs_fingerprint" in metadata else None


# ---------------------------------------------------------------------------------------------------
# Units (WebDataset shards, Parquet row groups): one part per finished unit, rows in the unit's own order


def unit_schema(num_levels: int, has_regressor: bool, keep_types: dict[str, Any]) -> pa.Schema:
    """The output columns of shard and Parquet inputs: the usual ones, `shard` (the input file), --keep columns.

    A --keep column whose type is not known from a Parquet schema (a WebDataset json member) is a string.
    """
    schema = part_schema(num_levels, has_regressor, with_index=False)
    extra = [("shard", pa.string())] + [(c, t if t is not None else pa.string()) for c, t in keep_types.items()]
    return pa.schema(list(schema) + [pa.field(name, kind) for name, kind in extra])


def unit_table(rows: dict[str, list], level_names: list[str], schema: pa.Schema) -> pa.Table:
    """One unit's rows as a table of `schema`: rows["probs"] holds float32 [K] arrays or None (failed)."""
    errors = rows["error"]
    failed = np.array([e is not None for e in errors], dtype=bool)
    n, k = len(errors), len(level_names)
    probs = np.zeros((n, k), dtype=np.float32)
    for i, p in enumerate(rows["probs"]):
        if p is not None:
            probs[i] = p
    levels = _numpy_array(probs.argmax(axis=1) if n else np.zeros(0, np.int64), pa.int64(), null=failed)
    width, height = np.asarray(rows["width"], dtype=np.int32), np.asarray(rows["height"], dtype=np.int32)
    columns = {
        "image": _string_array(rows["image"]),
        "score": _numpy_array(np.asarray(rows["score"], dtype=np.float32), pa.float32(), null=failed),
        "std": _numpy_array(np.asarray(rows["std"], dtype=np.float32), pa.float32(), null=failed),
        "probs": pa.ListArray.from_arrays(
            _numpy_array(np.arange(0, (n + 1) * k, k), pa.int32()),
            _numpy_array(probs.reshape(-1), pa.float32()),
            mask=_bool_array(failed),
        ),
        "level": _string_array(list(level_names)).take(levels),
        "width": _numpy_array(width, pa.int32(), null=width < 0),
        "height": _numpy_array(height, pa.int32(), null=height < 0),
        "error": _string_array(errors),
    }
    if "score_reg" in schema.names:
        columns["score_reg"] = _numpy_array(np.asarray(rows["score_reg"], dtype=np.float32), pa.float32(), null=failed)
    columns["shard"] = _string_array(rows["shard"])
    for name in schema.names[len(columns) :]:
        columns[name] = _kept_array(rows["keep"][name], schema.field(name).type)
    return pa.table(columns, schema=schema)


def _kept_array(values: list[Any], kind: pa.DataType) -> pa.Array:
    """A --keep column; values a string column cannot hold as they are (numbers, lists from json) become JSON."""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values = [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values]
    try:
        return pa.array(values, type=kind)
    except (pa.ArrowException, TypeError, ValueError):  # a shard whose json disagrees with the first shard's
        return pa.array([None] * len(values), type=kind)


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """`table` to `path` as Parquet (zstd): temporary name, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=OUTPUT_ROW_GROUP)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
