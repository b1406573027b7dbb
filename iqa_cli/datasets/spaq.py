"""SPAQ: `Annotations/MOS and Image attribute scores.xlsx` as released by the SPAQ authors (h4nwei/SPAQ).

Format (verified against pyiqa `scripts/process_spaq.py`, which reads the workbook with `pd.read_excel`
and its first sheet, and public SPAQ loaders reading `info['Image name']`, `info['MOS']`, some from a
CSV export `MOS and Image attribute scores.csv` with the same header):
- one header row: `Image name`, `MOS`, Brightness, Colorfulness, Contrast, Noisiness, Sharpness;
  `Image name` is a bare file name (`00001.jpg`) under `TestImage/`. MOS is on 0..100, higher is better.
- the official file has no std column. A column named std / SD / MOS std (any case) is used when present
  (for exports that add one); otherwise the rows get no std and their soft labels are the two-point
  interpolation unless `--pseudo-std` is given.
The workbook sheet is the first one holding both `Image name` and `MOS`.
"""

from __future__ import annotations

from pathlib import Path

from iqa_cli.datasets._common import (
    DatasetSpec,
    MetaTable,
    ReadOptions,
    common_table,
    excel_sheets,
    find_column,
    frame_with_header,
    pick_file,
    read_csv,
    require_columns,
)
from iqa_cli.errors import UserError

FILE_NAMES = ("MOS and Image attribute scores.xlsx", "MOS and Image attribute scores.csv")
IMAGE_COL, MOS_COL = "Image name", "MOS"
STD_NAMES = ("std", "sd", "mos std", "mos_std", "std_mos", "stddev")


def read(path: Path, options: ReadOptions) -> MetaTable:
    path = pick_file(path, FILE_NAMES, "SPAQ score file")
    if path.suffix.lower() in (".xlsx", ".xlsm", ".xls"):
        sheets = excel_sheets(path)
        frame = None
        for cells in sheets.values():
            frame = frame_with_header(cells, [IMAGE_COL, MOS_COL], scan_rows=5)
            if frame is not None:
                break
        if frame is None:
            raise UserError(
                f"{path}: no sheet has the columns {IMAGE_COL!r} and {MOS_COL!r} (sheets: {', '.join(sheets)})"
            )
    else:
        frame = read_csv(path)
        require_columns(frame, [IMAGE_COL, MOS_COL], path)
    return common_table(frame, path, image=IMAGE_COL, mos=MOS_COL, std=find_column(frame, STD_NAMES))


SPEC = DatasetSpec(
    name="spaq",
    title="SPAQ",
    source_help="'MOS and Image attribute scores.xlsx' (or the .csv export, or its directory)",
    reader=read,
)
