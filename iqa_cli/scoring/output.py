"""What `iqa score` writes: the output's columns, a unit's rows as a table, and the output file or folder.

Every source gives the same columns: `image`, `score`, `std`, `probs` (K float32, ascending quality), `level`,
`width`, `height`, `error`, `score_reg` for regression models, `score_soft` (and `reasoning` with
--keep-reasoning) for reasoning models, then the source's own (`shard` and the --keep columns of shards and Parquet
inputs). An output that may hold videos (a list of files naming one; shards and Parquet inputs always, since their
samples are known only when read and every unit's file is written with one schema before the first is read) has
`duration`, `frames` and `fps` after `height` (null on image rows), and `--per-frame` adds `frame`, the frame's
index in its video on the rows of single frames.

The output is assembled from the finished units in input order (`assemble_file`, streaming one unit at a time), or
written as one Parquet file per output stem of the source (`assemble_directory`, `--out DIR/`) with the run's
metadata in `DIR/_iqa.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iqa_cli.errors import UserError
from iqa_cli.files import atomic_file, atomic_write, fsync_dir

FORMATS = ("parquet", "csv", "jsonl")
SUFFIX_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
OUTPUT_ROW_GROUP = 65536
DIRECTORY_METADATA = "_iqa.json"  # --out DIR/: what a single-file output keeps in its footer (readers skip `_*`)


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


def meta_path(out: Path) -> Path:
    """Where CSV/JSONL outputs keep the key-value metadata that Parquet stores in its footer."""
    return out.with_name(out.name + ".meta.json")


VIDEO_COLUMNS = {"duration": pa.float32(), "frames": pa.int32(), "fps": pa.float32()}
FRAME_COLUMN = "frame"


def output_schema(
    num_levels: int,
    has_regressor: bool,
    extra: dict[str, Any],
    *,
    reasoning: bool = False,
    keep_text: bool = False,
    videos: bool = False,
    per_frame: bool = False,
) -> pa.Schema:
    """The output's columns; `extra` are the source's own (name -> arrow type, None: string). A reasoning model's
    (`iqa_cli.scoring.reasoning`) add `score_soft` and, with `keep_text`, the generated text `reasoning`; `videos`:
    the video columns, `per_frame`: the frame column."""
    fields = [
        ("image", pa.string()),
        ("score", pa.float32()),
        ("std", pa.float32()),
        ("probs", pa.list_(pa.float32())),
        ("level", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
    if videos or per_frame:
        fields += list(VIDEO_COLUMNS.items())
    if per_frame:
        fields.append((FRAME_COLUMN, pa.int32()))
    fields.append(("error", pa.string()))
    if has_regressor:
        fields.append(("score_reg", pa.float32()))
    if reasoning:
        fields.append(("score_soft", pa.float32()))
    if keep_text:
        fields.append(("reasoning", pa.string()))
    fields += [(name, kind if kind is not None else pa.string()) for name, kind in extra.items()]
    return pa.schema(fields)


def standard_columns() -> tuple[str, ...]:
    """Column names every output may have; a source's own columns must not take one."""
    return (*output_schema(1, True, {}, reasoning=True, keep_text=True, videos=True, per_frame=True).names, "shard")


def rows_table(chunks: list[dict[str, Any]], level_names: list[str], schema: pa.Schema, extra: dict) -> pa.Table:
    """Rows (`iqa_cli.scoring.store`'s chunks: numpy arrays and lists, scores ignored where `error` is set) as a
    table of `schema`, built from the buffers (pyarrow's numpy path imports pandas: 0.14 s)."""
    k = len(level_names)
    errors = [e for c in chunks for e in c["error"]]
    n = len(errors)
    failed = np.array([e is not None for e in errors], dtype=bool)

    def cat(key: str, dtype: Any, fill: float = 0) -> np.ndarray:
        parts = [c[key] if c.get(key) is not None else np.full(len(c["error"]), fill, dtype) for c in chunks]
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    probs = np.concatenate(
        [c["probs"] if c["probs"] is not None else np.zeros((len(c["error"]), k), np.float32) for c in chunks]
        or [np.zeros((0, k), np.float32)]
    ).astype(np.float32, copy=False)
    no_probs = failed | np.isnan(probs).any(axis=1)  # NaN: a reasoning answer without a digit readout
    probs = np.where(no_probs[:, None], 0, probs)
    levels = _numpy_array(probs.argmax(axis=1) if n else np.zeros(0, np.int64), pa.int64(), null=no_probs)
    width, height = cat("width", np.int32), cat("height", np.int32)
    std = cat("std", np.float32)
    columns = {
        "image": _string_array([name for c in chunks for name in c["image"]]),
        "score": _numpy_array(cat("score", np.float32), pa.float32(), null=failed),
        "std": _numpy_array(std, pa.float32(), null=failed | np.isnan(std)),
        "probs": pa.ListArray.from_arrays(
            _numpy_array(np.arange(0, (n + 1) * k, k), pa.int32()),
            _numpy_array(probs.reshape(-1), pa.float32()),
            mask=_bool_array(no_probs),
        ),
        "level": _string_array(list(level_names)).take(levels),
        "width": _numpy_array(width, pa.int32(), null=width < 0),
        "height": _numpy_array(height, pa.int32(), null=height < 0),
        "error": _string_array(errors),
    }
    if "score_reg" in schema.names:
        columns["score_reg"] = _numpy_array(cat("score_reg", np.float32), pa.float32(), null=failed)
    if "score_soft" in schema.names:
        soft = cat("score_soft", np.float32)
        columns["score_soft"] = _numpy_array(soft, pa.float32(), null=failed | np.isnan(soft))
    if "reasoning" in schema.names:
        texts = [t for c in chunks for t in (c.get("texts") or [None] * len(c["error"]))]
        columns["reasoning"] = _string_array(texts)
    if "duration" in schema.names:
        frames = cat("frames", np.int32, -1)
        columns["frames"] = _numpy_array(frames, pa.int32(), null=frames < 0)
        for name in ("duration", "fps"):
            values = cat(name, np.float32, np.nan)
            columns[name] = _numpy_array(values, pa.float32(), null=np.isnan(values))
    if FRAME_COLUMN in schema.names:
        frame = cat(FRAME_COLUMN, np.int32, -1)
        columns[FRAME_COLUMN] = _numpy_array(frame, pa.int32(), null=frame < 0)
    for name in extra:
        values = [kept.get(name) for c in chunks for kept in c["kept"]]
        columns[name] = _kept_array(values, schema.field(name).type)
    return pa.table(columns, schema=schema)


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


@dataclass
class RowCount:
    """What the summary line says of an output: its rows and failures, with the rows of videos and of their single
    frames (`--per-frame`) told apart so that a line about videos does not call them images."""

    rows: int = 0
    failed: int = 0
    videos: int = 0  # rows of videos that were scored (`frames` set on a video's own row)
    frame_rows: int = 0  # --per-frame rows (`frame` set), counted in `rows`
    frames_failed: int = 0  # of those, rows with `error` set, counted in `failed`
    first_errors: list[tuple[str, str]] = field(default_factory=list)  # (image, error) of the first few failures

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        errors = table.column("error")
        self.failed += table.num_rows - errors.null_count
        names = table.schema.names
        if "frame" in names:
            frame = table.column("frame")
            self.frame_rows += table.num_rows - frame.null_count
            self.frames_failed += _true(pc.and_(frame.is_valid(), errors.is_valid()))
        if "frames" in names:
            own = table.column("frames").is_valid()
            if "frame" in names:
                own = pc.and_(own, table.column("frame").is_null())
            self.videos += _true(own)
        if len(self.first_errors) < 5 and errors.null_count < table.num_rows:
            pairs = zip(table.column("image").to_pylist(), errors.to_pylist(), strict=True)
            self.first_errors += [(n, e) for n, e in pairs if e is not None][: 5 - len(self.first_errors)]


def _true(mask: Any) -> int:
    return int(pc.sum(mask.cast(pa.int64())).as_py() or 0)


def write_output(
    out: Path, fmt: str, chunks: Iterator[pa.Table], schema: pa.Schema, metadata: dict[str, str]
) -> RowCount:
    """Writes the merged rows to `out` atomically; returns what they hold."""
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by an assembly that was killed
        stale.unlink(missing_ok=True)
    count = RowCount()
    schema = schema.with_metadata(metadata)
    with atomic_file(out) as tmp:
        with _OutputWriter(tmp, fmt, schema) as writer:
            for chunk in chunks:
                chunk = chunk.cast(schema)
                count.add(chunk)
                writer.write(chunk)
        if fmt != "parquet":  # with the row count, which a Parquet footer has and a text file does not
            text = json.dumps({**metadata, "rows": str(count.rows)}, indent=1, sort_keys=True)
            atomic_write(meta_path(out), text.encode())
    return count


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


def _kept_array(values: list[Any], kind: pa.DataType) -> pa.Array:
    """A source's own column (`shard`, --keep); values a string column cannot hold as they are (numbers, lists from
    json) become JSON. Strings are built from the buffers, other types by `pa.array` (which imports pandas)."""
    if pa.types.is_string(kind):
        return _string_array(
            [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values]
        )
    if pa.types.is_large_string(kind):
        values = [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values]
    try:
        return pa.array(values, type=kind)
    except (pa.ArrowException, TypeError, ValueError):  # a shard whose json disagrees with the first shard's
        return pa.array([None] * len(values), type=kind)


def assemble_file(
    out: Path, fmt: str, unit_files: Iterable[Path], schema: pa.Schema, metadata: dict[str, str]
) -> RowCount:
    """The finished units' files, in unit order, as the output file (written atomically, one unit in memory)."""
    return write_output(out, fmt, (pq.ParquetFile(path).read() for path in unit_files), schema, metadata)


def assemble_directory(
    out: Path, groups: dict[str, list[Path | None]], schema: pa.Schema, metadata: dict[str, str]
) -> RowCount:
    """`--out DIR/`: one `DIR/<stem>.parquet` per group of units, then `DIR/_iqa.json`; counts the rows.

    `groups` maps each output stem to its units' sidecar files in order, None for a unit already written to
    its output file (a group of one unit is written there as soon as it finishes). Returns what the rows hold.
    """
    count = RowCount()
    for stem, files in groups.items():
        path = out / f"{stem}.parquet"
        if any(f is not None for f in files) or not files:  # a group of several units, or an empty input
            tables = [pq.ParquetFile(f).read().cast(schema) for f in files if f is not None]
            table = pa.concat_tables(tables) if tables else schema.empty_table()
            write_table_atomic(table.replace_schema_metadata(schema.metadata), path)
        counted = [name for name in ("image", "error", "frames", "frame") if name in schema.names]
        count.add(pq.ParquetFile(path).read(columns=counted))
    atomic_write(out / DIRECTORY_METADATA, json.dumps(metadata, indent=1, sort_keys=True).encode())
    fsync_dir(out)
    return count


def recorded_rows(out: Path, fmt: str) -> int:
    """Rows of a finished output, from its footer (Parquet) or its `.meta.json` (CSV, JSON Lines); 0 if unknown."""
    try:
        if out.is_dir():
            return sum(pq.read_metadata(p).num_rows for p in out.glob("*.parquet"))
        if fmt == "parquet":
            return pq.read_metadata(out).num_rows
        return int(json.loads(meta_path(out).read_text())["rows"])
    except Exception:
        pass
    return 0


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """`table` to `path` as Parquet (zstd) through `files.atomic_file`."""
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=OUTPUT_ROW_GROUP)
