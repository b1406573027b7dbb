"""LIVE In the Wild Image Quality Challenge (LIVE-itW / CLIVE): the three `.mat` files of the release.

Format (verified against pyiqa `scripts/process_livechallenge.py` and public loaders):
- `Data/AllImages_release.mat` holds `AllImages_release`, a 1169x1 cell array of file names
  (`item[0][0]` after scipy.io.loadmat); `Data/AllMOS_release.mat` holds `AllMOS_release` and
  `Data/AllStdDev_release.mat` holds `AllStdDev_release`, both 1x1169 in the same order.
- MOS on 0..100, higher is better; std from AllStdDev_release.
- the first seven names (t1.bmp..t7.bmp) are the release's training images, stored in
  `Images/trainingImages/`; their image path is written as `trainingImages/tN.bmp` so that
  `--images .../Images` finds them. pyiqa and HyperIQA drop them ([7:1169]); Q-Align's livec test set keeps
  all 1169. They are kept (drop them with a split file if wanted).
`--csv` takes the `Data` directory, the release root above it, or any one of the three files.
"""

from __future__ import annotations

import re
from pathlib import Path

from iqa_cli.datasets._common import DatasetSpec, MetaTable, ReadOptions, common_table, require_path
from iqa_cli.errors import UserError

FILES = {"image": "AllImages_release", "mos": "AllMOS_release", "std": "AllStdDev_release"}
TRAINING_IMAGE = re.compile(r"^t\d+\.bmp$", re.IGNORECASE)


def _data_dir(path: Path) -> Path:
    require_path(path, "LIVE Challenge .mat file or directory")
    if path.is_file():
        return path.parent
    if not (path / f"{FILES['mos']}.mat").exists() and (path / "Data").is_dir():
        return path / "Data"
    return path


def _load_mat(path: Path, key: str):
    import numpy as np
    from scipy import io

    if not path.is_file():
        raise UserError(f"LIVE Challenge file not found: {path}")
    try:
        content = io.loadmat(str(path))
    except (ValueError, OSError, TypeError, NotImplementedError) as exc:
        raise UserError(f"{path}: cannot read as a MATLAB .mat file: {' '.join(str(exc).split())}") from None
    if key not in content:
        found = ", ".join(k for k in content if not k.startswith("__")) or "none"
        raise UserError(f"{path}: no variable {key!r} (variables found: {found})")
    return np.asarray(content[key])


def _cell_strings(cells) -> list[str]:
    import numpy as np

    names = []
    for cell in cells.reshape(-1):
        value = np.asarray(cell).reshape(-1)
        names.append(str(value[0]).strip() if value.size else "")
    return names


def read(path: Path, options: ReadOptions) -> MetaTable:
    import pandas as pd

    data = _data_dir(path)
    files = {name: data / f"{stem}.mat" for name, stem in FILES.items()}
    names = _cell_strings(_load_mat(files["image"], FILES["image"]))
    mos = _load_mat(files["mos"], FILES["mos"]).reshape(-1)
    std = _load_mat(files["std"], FILES["std"]).reshape(-1)
    if not len(names) == mos.size == std.size:
        raise UserError(
            f"{data}: the .mat files disagree in length: {len(names)} names, {mos.size} MOS, {std.size} std"
        )
    paths = [f"trainingImages/{n}" if TRAINING_IMAGE.match(n) else n for n in names]
    frame = pd.DataFrame({"image": paths, "mos": mos, "std": std, "name": names})
    table = common_table(frame, files["image"], image="image", mos="mos", std="std")
    table.source = str(data)
    table.columns = {"image": FILES["image"], "mos": FILES["mos"], "std": FILES["std"]}
    return table


SPEC = DatasetSpec(
    name="livew",
    title="LIVE In the Wild (LIVE Challenge)",
    source_help="the Data directory with AllImages_release.mat, AllMOS_release.mat, AllStdDev_release.mat "
    "(or one of them)",
    reader=read,
)
