"""CSIQ: `csiq.DMOS.xlsx` (sheet `all_by_image`) as released by the CSIQ authors, or `csiq_label.txt`.

Format of the workbook (verified against public readers of `csiq.DMOS.xlsx`, which open the sheet
`all_by_image`, find the header on its 4th row starting in column D, `image, dst_idx, dst_type, dst_lev,
dmos_std, dmos`, and map names onto files; and against Q-Align's `csiq.json`, whose paths are
`dst_imgs/<folder>/<image>.<TOKEN>.<level>.png`, e.g. `dst_imgs/awgn/1600.AWGN.1.png`):
- dst_type -> (folder, file token): noise -> awgn/AWGN, jpeg -> jpeg/JPEG, jpeg 2000 -> jpeg2000/jpeg2000,
  fnoise -> fnoise/fnoise, blur -> blur/BLUR, contrast -> contrast/contrast;
  image path written as `<folder>/<image>.<TOKEN>.<level>.png`, relative to `dst_imgs/`.
- `dmos` in 0..1, LOWER is better (pyiqa's config: lower_better true); `dmos_std` is its std.
The text form (pyiqa's `csiq_label.txt`, read by `scripts/process_csiq.py`): `name dmos` per line,
whitespace-separated, no header, no std.
Rows are grouped by reference image (`<image>.png`) for the seeded split.
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
    pick_file,
    read_csv,
)
from iqa_cli.errors import UserError

FILE_NAMES = ("csiq.DMOS.xlsx", "csiq_label.txt")
SHEET = "all_by_image"
HEADER = ("image", "dst_type", "dst_lev", "dmos_std", "dmos")
DISTORTIONS = {
    "noise": ("awgn", "AWGN"),
    "jpeg": ("jpeg", "JPEG"),
    "jpeg 2000": ("jpeg2000", "jpeg2000"),
    "fnoise": ("fnoise", "fnoise"),
    "blur": ("blur", "BLUR"),
    "contrast": ("contrast", "contrast"),
}


def _as_name(value) -> str:
    """Workbook cells hold numbers for numeric names (1600 -> "1600")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _read_workbook(path: Path) -> MetaTable:
    import pandas as pd

    sheets = excel_sheets(path)
    if SHEET not in sheets:
        raise UserError(f"{path}: no sheet {SHEET!r} (sheets: {', '.join(sheets)})")
    frame = frame_with_header(sheets[SHEET], HEADER)
    if frame is None:
        raise UserError(f"{path}: sheet {SHEET!r} has no header row with {', '.join(HEADER)}")
    frame = frame[frame["image"].notna()].reset_index(drop=True)
    kinds = frame["dst_type"].astype(str).str.strip().str.lower()
    unknown = sorted(set(kinds) - set(DISTORTIONS))
    if unknown:
        raise UserError(f"{path}: unknown dst_type {unknown[0]!r} in sheet {SHEET!r} (known: {', '.join(DISTORTIONS)})")
    names = frame["image"].map(_as_name)
    levels = pd.to_numeric(frame["dst_lev"], errors="coerce")
    if levels.isna().any() or (levels != levels.round()).any():
        bad = frame["dst_lev"][levels.isna() | (levels != levels.round())].iloc[0]
        raise UserError(f"{path}: non-integer dst_lev {bad!r} in sheet {SHEET!r}")
    folders = kinds.map(lambda k: DISTORTIONS[k][0])
    tokens = kinds.map(lambda k: DISTORTIONS[k][1])
    frame = frame.assign(
        path=folders + "/" + names + "." + tokens + "." + levels.astype(int).astype(str) + ".png",
        ref=names + ".png",
        image=names,
    )
    table = common_table(frame, path, image="path", mos="dmos", std="dmos_std", ref="ref")
    table.source = f"{path} [{SHEET}]"
    return table


def _read_text(path: Path) -> MetaTable:
    frame = read_csv(path, sep=r"\s+", header=None, dtype=str)
    if frame.shape[1] != 2:
        raise UserError(f"{path}: expected 'name dmos' per line, found {frame.shape[1]} fields")
    frame.columns = ["image", "dmos"]
    frame["ref"] = frame["image"].str.split(".").str[0] + ".png"
    table = common_table(frame, path, image="image", mos="dmos", std=None, ref="ref")
    table.columns = {"image": "1st field", "mos": "2nd field (dmos)"}
    return table


def read(path: Path, options: ReadOptions) -> MetaTable:
    path = pick_file(path, FILE_NAMES, "CSIQ DMOS file")
    if path.suffix.lower() in (".xlsx", ".xlsm", ".xls"):
        return _read_workbook(path)
    return _read_text(path)


SPEC = DatasetSpec(
    name="csiq",
    title="CSIQ",
    source_help="csiq.DMOS.xlsx (sheet all_by_image) or csiq_label.txt (or their directory)",
    reader=read,
    lower_is_better=True,
)
