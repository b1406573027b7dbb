"""Parquet files with an image column, read one row group at a time with pyarrow.

The column holds encoded image bytes (binary), or `{bytes, path}` structs as Hugging Face `datasets`
writes its `Image` feature. Listing reads only each file's footer (schema, row groups, row counts).
A row's name in the output's `image` column is the struct's `path` when it has one, else the row's number in
its file. A cell holds a video when the struct's `path` has a video suffix or its bytes start like a video
container (MP4/MOV, Matroska/WebM, AVI: `iqa_cli.video.looks_like_video`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from iqa_cli.errors import UserError
from iqa_cli.sources import DataFiles, Sample, SourceOptions, unique_files
from iqa_cli.video import is_video_name, looks_like_video

NULL_IMAGE = "no image bytes in this row (null)"  # a null cell's error (RayScorer's and Daft's too)

DEFAULT_IMAGE_COLUMN = "image"  # Hugging Face `datasets`' name for an Image feature


@dataclass(kw_only=True)
class ParquetSource(DataFiles):
    """Parquet image tables as a `Source`: unit u is row group `row_group[u]` of file `file_of[u]`; rows carry
    `shard` (the file) and the --keep columns."""

    kind: ClassVar[str] = "parquet"
    noun: ClassVar[str] = "row groups"
    file_of: np.ndarray  # int32 [U]
    row_group: np.ndarray  # int32 [U]
    first_row: np.ndarray  # int64 [U]: the unit's first row's number in its file
    row_count: np.ndarray  # int64 [U]
    image_col: str = DEFAULT_IMAGE_COLUMN
    may_hold_videos: ClassVar[bool] = True  # any cell may be one: known only when read

    def __len__(self) -> int:
        return len(self.file_of)

    def label(self, u: int) -> str:
        return f"{self.paths[int(self.file_of[u])]} row group {int(self.row_group[u])}"

    def rows(self, u: int) -> int:
        return int(self.row_count[u])

    count_rows = rows

    def output_stem(self, u: int) -> str:
        return self.stems[int(self.file_of[u])]

    def num_inputs(self) -> int:
        return len(self)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self.image_col}\0{','.join(self.keep)}\0".encode())
        for u in range(len(self)):
            digest.update(self.label(u).encode("utf-8", "surrogateescape") + b"\0")
        return digest.hexdigest()

    def samples(self, u: int, start: int = 0) -> Iterator[Sample]:
        path = self.paths[int(self.file_of[u])]
        rows = samples(path, int(self.row_group[u]), int(self.first_row[u]), self.image_col, self.keep, start)
        for name, data, error, kept, video in rows:
            yield Sample(name, data=data, error=error, kept={"shard": path, **kept}, video=video)


def open_source(names: list[str], options: SourceOptions) -> ParquetSource:
    """`iqa_cli.sources`' entry: the row groups of the Parquet files `names` (already expanded), from footers."""
    image_col = options.image_col or DEFAULT_IMAGE_COLUMN
    keep = [c for c in options.keep if c]
    warnings: list[str] = []
    files = unique_files(names, warnings)
    file_of, row_group, first_row, rows = [], [], [], []
    keep_types: dict[str, Any] = {}
    for i, (path, _) in enumerate(files):
        counts, types = describe(path, image_col, keep)
        keep_types = keep_types or types
        for c, t in types.items():
            if t != keep_types[c]:
                raise UserError(f"--keep {c}: {path} holds {t}, {files[0][0]} holds {keep_types[c]}")
        start = 0
        for g, count in enumerate(counts):
            file_of.append(i)
            row_group.append(g)
            first_row.append(start)
            rows.append(count)
            start += count
    return ParquetSource(
        paths=[p for p, _ in files],
        stems=[s for _, s in files],
        file_of=np.asarray(file_of, dtype=np.int32),
        row_group=np.asarray(row_group, dtype=np.int32),
        first_row=np.asarray(first_row, dtype=np.int64),
        row_count=np.asarray(rows, dtype=np.int64),
        image_col=image_col,
        keep=keep,
        columns={"shard": None, **keep_types},
        warnings=warnings,
    )


def describe(path: str, image_col: str, keep: list[str]) -> tuple[list[int], dict[str, Any]]:
    """Rows per row group and the arrow types of the --keep columns, from the footer only.

    Raises:
        UserError: not a Parquet file, no such image column (its columns are listed), a column of another
            type, or a --keep column it does not have.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())})") from None
    names = schema.names
    if image_col not in names:
        raise UserError(
            f"{path}: no image column {image_col!r} (columns: {', '.join(names)}); name it with --image-col"
        )
    kind = schema.field(image_col).type
    if not _is_image_type(kind):
        raise UserError(
            f"{path}: column {image_col!r} is {kind}, not image bytes (binary) or {{bytes, path}} structs; "
            "name the image column with --image-col"
        )
    missing = [c for c in keep if c not in names]
    if missing:
        raise UserError(f"--keep {','.join(missing)}: no such column in {path} (columns: {', '.join(names)})")
    rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return rows, {c: schema.field(c).type for c in keep}


def _is_image_type(kind: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_struct(kind):
        fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
        data = fields.get("bytes")
        return data is not None and (pa.types.is_binary(data) or pa.types.is_large_binary(data))
    return False


def samples(
    path: str, row_group: int, first_row: int, image_col: str, keep: list[str], start: int = 0
) -> Iterator[tuple[str, bytes | None, str | None, dict[str, Any], bool]]:
    """Yields (name, image or video bytes or None, error or None, {kept column: value}, is a video) per row of one
    row group, from its `start`-th row on."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path).read_row_group(row_group, columns=[image_col, *[c for c in keep if c != image_col]])
    table = table.slice(start)
    images = table.column(image_col).to_pylist()
    kept = {c: table.column(c).to_pylist() for c in keep}
    for i, value in enumerate(images):
        name, data, path = str(first_row + start + i), value, None
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if path:
                name = str(path)
        row = {c: kept[c][i] for c in keep}
        if data is None:
            yield name, None, NULL_IMAGE, row, False
        else:
            yield name, data, None, row, bool(path and is_video_name(str(path))) or looks_like_video(data)
