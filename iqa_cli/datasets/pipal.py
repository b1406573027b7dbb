"""PIPAL (training part): the Elo label files `Train_Label/A0001.txt ...` released by the PIPAL authors.

Format (verified against pyiqa `scripts/process_pipal.py`: every `Train_Label/*.txt`, sorted, one
`name,score` pair per line, split on the comma; reference image = the name's prefix before the first
`_` + `.bmp`, e.g. `A0001_00_00.bmp` -> `A0001.bmp`):
- no header; `distorted image name,Elo score` per line; names are bare, the images lie in
  `Distortion_1..4/` folders of the training release (DeQA-Score's layout `PIPAL/images/Distortion_*/*.bmp`;
  `iqa prepare --images` finds them by file name).
- higher Elo is better. PIPAL publishes no std: the pseudo std is 20% of the score range
  (`--pseudo-std`, default 0.2 for this preset).
`--csv` takes the label directory (every *.txt in it) or one label file.
"""

from __future__ import annotations

from pathlib import Path

from iqa_cli.datasets._common import DatasetSpec, MetaTable, ReadOptions, common_table, read_csv, require_path
from iqa_cli.errors import UserError


def read(path: Path, options: ReadOptions) -> MetaTable:
    import pandas as pd

    require_path(path, "PIPAL label file or directory")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"no PIPAL label files (*.txt) in directory {path}")
    parts = []
    for file in files:
        if file.stat().st_size == 0:
            continue
        part = read_csv(file, header=None, dtype=str, skipinitialspace=True)
        if part.shape[1] != 2:
            raise UserError(f"{file}: expected 'name,score' per line, found {part.shape[1]} fields")
        parts.append(part)
    if not parts:
        raise UserError(f"{path}: the PIPAL label files are empty")
    frame = pd.concat(parts, ignore_index=True)
    frame.columns = ["image", "elo"]
    frame["ref"] = frame["image"].str.strip().str.split("_").str[0] + ".bmp"
    table = common_table(frame, path, image="image", mos="elo", std=None, ref="ref")
    table.columns["mos"] = "Elo score (2nd field)"
    return table


SPEC = DatasetSpec(
    name="pipal",
    title="PIPAL",
    source_help="the Train_Label directory of Elo label .txt files (or one of them)",
    reader=read,
    pseudo_std=0.2,
)
