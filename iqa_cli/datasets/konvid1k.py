"""KoNViD-1k (Hosu et al., QoMEX 2017): 1,200 Flickr videos of 8 s, rated on a 1..5 ACR scale.

Format. The release ships `KoNViD_1k_mos.csv` and `KoNViD_1k_attributes.csv`:
- `KoNViD_1k_mos.csv`: comma-separated, one header row `flickr_id,mos` (confirmed from public loaders, which read
  `row[0]`, `row[1]` and the columns `flickr_id`, `mos`); the video is `KoNViD_1k_videos/<flickr_id>.mp4`.
- `KoNViD_1k_attributes.csv`: public loaders read its `flickr_id` and `MOS` columns (and `file_name`, the older
  release's long video names); whether it has a std column could not be confirmed here: an `SD` (or `std`)
  column is used when present, else the rows have no std.
Column names are matched without regard to case. The MOS is on 1..5 (Q-Align's `konvid.json` holds it as
`gt_score`), higher is better, normalized by its min/max as other datasets. No official split (papers use random
80/20 splits): the split is seeded unless `--split` names one.
"""

from __future__ import annotations

from pathlib import Path

from iqa_cli.datasets._common import (
    DatasetSpec,
    MetaTable,
    ReadOptions,
    common_table,
    find_column,
    find_columns,
    pick_file,
    read_csv,
)

FILES = ("KoNViD_1k_mos.csv", "KoNViD_1k_attributes.csv")


def read(path: Path, options: ReadOptions) -> MetaTable:
    path = pick_file(path, FILES, "KoNViD-1k score file")
    frame = read_csv(path, dtype={"flickr_id": str})
    video_id, mos = find_columns(frame, path, "KoNViD-1k's score files", "flickr_id", "mos")
    std = find_column(frame, ["sd", "std"])
    frame = frame.assign(video=frame[video_id].astype(str).str.strip() + ".mp4")
    return common_table(frame, path, image="video", mos=mos, std=std, drop=[video_id])


SPEC = DatasetSpec(
    name="konvid1k",
    title="KoNViD-1k (videos)",
    source_help=f"{FILES[0]} or {FILES[1]} (or their directory); videos <flickr_id>.mp4",
    reader=read,
)
