"""TID2013: `mos_with_names.txt` + `mos_std.txt` as released by the TID2013 authors (Ponomarenko et al.).

Format (verified against pyiqa `scripts/process_tid.py` and the authors' MATLAB readers):
- `mos_with_names.txt`: one `MOS name` pair per line, whitespace-separated, no header
  (`5.51429 i01_01_1.bmp`); `mos_std.txt`: one std per line, same order, no header.
- names are lower-case `iXX_TT_L.bmp` while most files on disk are `IXX_TT_L.BMP`-style upper-case
  (pyiqa swaps the case when the file is missing); `--images` matches names case-insensitively.
- MOS on 0..9, higher is better. Reference image: `I01.BMP`.. `I24.BMP` and `i25.bmp` (pyiqa); rows are
  grouped by reference for the seeded split; distortion type and level are kept as extras.
`--csv` takes the directory or mos_with_names.txt; mos_std.txt is read from beside it.
"""

from __future__ import annotations

import re
from pathlib import Path

from iqa_cli.datasets._common import DatasetSpec, MetaTable, ReadOptions, common_table, pick_file, read_csv
from iqa_cli.errors import UserError

MOS_FILE, STD_FILE = "mos_with_names.txt", "mos_std.txt"
NAME = re.compile(r"^[iI](\d\d)_(\d\d)_(\d)\.bmp$", re.IGNORECASE)


def read(path: Path, options: ReadOptions) -> MetaTable:
    import pandas as pd

    mos_path = pick_file(path, [MOS_FILE], "TID2013 MOS file")
    std_path = mos_path.parent / STD_FILE
    if not std_path.is_file():
        raise UserError(f"TID2013 std file not found: {std_path} (expected beside {mos_path.name})")
    frame = read_csv(mos_path, sep=r"\s+", header=None, dtype=str)
    if frame.shape[1] != 2:
        raise UserError(f"{mos_path}: expected 'MOS name' per line, found {frame.shape[1]} fields")
    frame.columns = ["mos", "image"]
    std = read_csv(std_path, sep=r"\s+", header=None, dtype=str)
    if std.shape[1] != 1 or len(std) != len(frame):
        raise UserError(
            f"{std_path}: expected one std per line for the {len(frame)} images of {mos_path.name}, "
            f"found {len(std)} lines of {std.shape[1]} fields"
        )
    frame["std"] = std.iloc[:, 0].to_numpy()
    parts = frame["image"].str.extract(NAME)
    frame["ref"] = ("I" + parts[0] + ".BMP").where(parts[0] != "25", "i25.bmp")
    frame["dist_type"] = pd.to_numeric(parts[1], errors="coerce").astype("Int64")
    frame["dist_level"] = pd.to_numeric(parts[2], errors="coerce").astype("Int64")
    frame["ref"] = frame["ref"].fillna(frame["image"])
    table = common_table(frame, mos_path, image="image", mos="mos", std="std", ref="ref")
    table.source = f"{mos_path} + {std_path.name}"
    table.columns = {"image": f"{MOS_FILE} (2nd field)", "mos": f"{MOS_FILE} (1st field)", "std": STD_FILE}
    return table


SPEC = DatasetSpec(
    name="tid2013",
    title="TID2013",
    source_help="the directory with mos_with_names.txt and mos_std.txt (or mos_with_names.txt)",
    reader=read,
)
