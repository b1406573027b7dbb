"""Any table of opinion scores: the user names the columns (`--image-col --mos-col [--std-col]`).

Reads .csv (comma), .tsv (tab), .xlsx (first sheet with the named columns) and .parquet. Scores are
higher-is-better unless `--lower-is-better`.
"""

from __future__ import annotations

from pathlib import Path

from iqa_cli.datasets._common import (
    DatasetSpec,
    MetaTable,
    ReadOptions,
    common_table,
    excel_sheets,
    frame_with_header,
    read_csv,
    require_columns,
    require_path,
)
from iqa_cli.errors import UserError


def _read_any(path: Path, required: list[str]):
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm", ".xls"):
        sheets = excel_sheets(path)
        for cells in sheets.values():
            frame = frame_with_header(cells, required)
            if frame is not None:
                return frame
        wanted = ", ".join(map(repr, required))
        raise UserError(f"{path}: no sheet has the columns {wanted} (sheets: {', '.join(sheets)})")
    if suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read as Parquet: {' '.join(str(exc).split())}") from None
    return read_csv(path, sep="\t" if suffix == ".tsv" else ",")


def read(path: Path, options: ReadOptions) -> MetaTable:
    if not options.image_col or not options.mos_col:
        raise UserError("the custom dataset needs --image-col and --mos-col")
    require_path(path, "score file")
    if path.is_dir():
        raise UserError(f"the custom dataset needs a file, got the directory {path}")
    required = [options.image_col, options.mos_col] + ([options.std_col] if options.std_col else [])
    frame = _read_any(path, required)
    require_columns(frame, required, path)
    return common_table(frame, path, image=options.image_col, mos=options.mos_col, std=options.std_col)


SPEC = DatasetSpec(
    name="custom",
    title="custom table",
    source_help="any .csv/.tsv/.xlsx/.parquet file, with --image-col, --mos-col [--std-col] [--lower-is-better]",
    reader=read,
)
