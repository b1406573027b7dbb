"""Parquet files with an image column, read one row group at a time with pyarrow.

The column holds encoded image bytes (binary), or `{bytes, path}` structs as Hugging Face `datasets`
writes its `Image` feature. Listing reads only each file's footer (schema, row groups, row counts).
A row's name in the output's `image` column is the struct's `path` when it has one, else the row's number in
its file.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from iqa_cli.errors import UserError


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
    path: str, row_group: int, first_row: int, image_col: str, keep: list[str]
) -> Iterator[tuple[str, bytes | None, str | None, dict[str, Any]]]:
    """Yields (name, image bytes or None, error or None, {kept column: value}) per row of one row group."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path).read_row_group(row_group, columns=[image_col, *[c for c in keep if c != image_col]])
    images = table.column(image_col).to_pylist()
    kept = {c: table.column(c).to_pylist() for c in keep}
    for i, value in enumerate(images):
        name, data = str(first_row + i), value
        if isinstance(value, dict):
            data = value.get("bytes")
            if value.get("path"):
                name = str(value["path"])
        row = {c: kept[c][i] for c in keep}
        if data is None:
            yield name, None, "no image bytes in this row (null)", row
        else:
            yield name, data, None, row
