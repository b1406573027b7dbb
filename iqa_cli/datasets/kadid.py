"""KADID-10k: `dmos.csv` as released by the KADID authors (MMSP Konstanz).

Format (verified against pyiqa `scripts/process_kadid10k.py`, which reads row[0..3] after one header row
and names them dist_name, ref_name, dmos, std, and public loaders with the header
`dist_img,ref_img,dmos,var`):
- comma-separated, header `dist_img,ref_img,dmos,var`; names are bare (`I01_01_01.png`, reference
  `I01.png`) under `images/`.
- despite its name `dmos` is a quality MOS on 1..5, higher is better (pyiqa's config: mos_range [1, 5],
  lower_better false; Q-Align labels `I66_01_01.png->4.63` "excellent").
- `var` is the variance of the ratings: std = sqrt(var) (the issue's spec). Note: one public loader
  claims `var` already holds a standard deviation; the published files cannot settle it here.
Rows are grouped by `ref_img` for the seeded split. Density default pdf (DeQA-Score's config).
"""

from __future__ import annotations

from pathlib import Path

from iqa_cli.datasets._common import DatasetSpec, MetaTable, ReadOptions, common_table, load_csv
from iqa_cli.errors import UserError

FILE_NAME = "dmos.csv"


def read(path: Path, options: ReadOptions) -> MetaTable:
    import numpy as np
    import pandas as pd

    path, frame = load_csv(path, FILE_NAME, "KADID-10k dmos file", ["dist_img", "ref_img", "dmos", "var"])
    var = pd.to_numeric(frame["var"], errors="coerce")
    negative = var < 0
    if negative.any():
        first = int(np.flatnonzero(negative.to_numpy())[0])
        raise UserError(
            f"{path}: negative variance {var.iloc[first]:g} in column 'var' for image {frame['dist_img'].iloc[first]!r}"
        )
    frame = frame.assign(std=np.sqrt(var))
    table = common_table(frame, path, image="dist_img", mos="dmos", std="std", ref="ref_img")
    table.columns["std"] = "var"
    return table


SPEC = DatasetSpec(
    name="kadid",
    title="KADID-10k",
    source_help="dmos.csv (or its directory)",
    reader=read,
    density="pdf",
)
