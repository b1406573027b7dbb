"""LSVQ (Ying et al., "Patch-VQ", CVPR 2021): about 39,000 user videos with crowd MOS, the video set of OneAlign.

Format. The release (baidut/PatchVQ) ships two label files:
- `labels_train_test.csv`: one row per video; `name` is the video's path without its suffix (e.g.
  `yfcc-batch1/13915`, the video `<name>.mp4`), `mos` its score on 0..100, `is_test` whether it is in the official
  test set (the release's README: "`is_test` column denotes if a video is in the train set or the test set"), and
  patch columns (`p1`..`p3`, `mos_p1`.., coordinates, `height`, `width`, `frame_number`, ...) kept as extras.
  The column names are confirmed from public loaders (`name`, `mos`, `height`, `width`, `frame_number`, the patch
  columns); the values of `is_test` are read as true/false or 1/0.
- `labels_test_1080p.csv`: the 1080p test set, the same `name` and `mos` (no `is_test`): all of its rows are test
  rows; prepare it as its own dataset (`--name lsvq1080p`).
Given the folder, `labels_train_test.csv` is read. No std is published: the soft labels are the two-point
interpolation unless `--pseudo-std` is given. Higher is better; scores are normalized by their min/max.
"""

from __future__ import annotations

from pathlib import Path

from iqa_cli.datasets._common import (
    OFFICIAL_SPLIT,
    DatasetSpec,
    MetaTable,
    ReadOptions,
    common_table,
    find_column,
    find_columns,
    pick_file,
    read_csv,
)
from iqa_cli.errors import UserError

FILES = ("labels_train_test.csv", "labels_test_1080p.csv")
_TRUE, _FALSE = {"true", "1", "1.0", "yes"}, {"false", "0", "0.0", "no"}


def read(path: Path, options: ReadOptions) -> MetaTable:
    path = pick_file(path, FILES, "LSVQ label file")
    frame = read_csv(path, dtype={"name": str})
    name, mos = find_columns(frame, path, "LSVQ's label files", "name", "mos")
    frame = frame.assign(video=frame[name].astype(str).str.strip() + ".mp4")
    is_test = find_column(frame, ["is_test"])
    if is_test is not None:
        flags = frame[is_test].astype(str).str.strip().str.lower()
        unknown = ~flags.isin(_TRUE | _FALSE)
        if unknown.any():
            raise UserError(f"{path}: is_test holds {frame[is_test][unknown].iloc[0]!r}; expected true/false or 1/0")
        frame[OFFICIAL_SPLIT] = flags.map(lambda v: "test" if v in _TRUE else "train")
    elif path.name == FILES[1]:
        frame[OFFICIAL_SPLIT] = "test"
    table = common_table(frame, path, image="video", mos=mos, std=None, drop=[name, *([is_test] if is_test else [])])
    return table


SPEC = DatasetSpec(
    name="lsvq",
    title="LSVQ (videos)",
    source_help=f"{FILES[0]} (or its directory), or {FILES[1]}; videos <name>.mp4",
    reader=read,
)
