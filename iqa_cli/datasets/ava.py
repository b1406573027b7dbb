"""AVA (Aesthetic Visual Analysis, Murray et al., CVPR 2012): `AVA.txt` of the June 2012 release.

Format (the release's own readme, "Content of AVA.txt", quoted by public loaders):
- one line per image, space-separated, no header: column 1 an index, column 2 the image ID, columns 3-12 the
  counts of aesthetic ratings 1..10 (column 3 the count of 1s), columns 13-14 semantic tag IDs (0: none), column
  15 the challenge ID. The image is `<image ID>.jpg` (the usual layout of the downloaded images).
- about 210 votes per image: the vote histogram is the measured score distribution. The MOS is its mean and the
  std its (population) standard deviation on the 1..10 scale; both are normalized by the scale's bounds 1 and 10
  (`DatasetSpec.scale`), so they are the histogram's moments rescaled to 1..5. Higher is better.
- the official split: `aesthetics_image_lists/generic_ls_train.jpgl` (the large-scale train set) and
  `generic_test.jpgl`, one image ID per line, used when they are beside AVA.txt (the release's layout); images in
  neither list are left out. Without them the split is seeded, as for other datasets.
The ratings are aesthetic, so a model trained on it is asked about the aesthetics of the image (Q-Align's
aesthetic prompt). `--soft-labels histogram` trains on the measured histogram (`labels.histogram_soft_labels`).
"""

from __future__ import annotations

from pathlib import Path

from iqa_cli.datasets._common import OFFICIAL_SPLIT, DatasetSpec, MetaTable, ReadOptions, pick_file, require_path
from iqa_cli.errors import UserError

FILE_NAME = "AVA.txt"
VOTES = tuple(f"votes_{rating}" for rating in range(1, 11))  # counts of the ratings 1..10
COLUMNS = ("index", "image_id", *VOTES, "tag_1", "tag_2", "challenge")
LISTS = {"train": "generic_ls_train.jpgl", "test": "generic_test.jpgl"}
LIST_FOLDER = "aesthetics_image_lists"


def read(path: Path, options: ReadOptions) -> MetaTable:
    import numpy as np
    import pandas as pd

    path = pick_file(path, [FILE_NAME, f"AVA_dataset/{FILE_NAME}"], "AVA file")
    try:
        frame = pd.read_csv(path, sep=r"\s+", header=None, dtype=str, engine="python")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot parse as AVA.txt: {' '.join(str(exc).split())}") from None
    if frame.shape[1] != len(COLUMNS):
        raise UserError(
            f"{path}: {frame.shape[1]} columns per line, AVA.txt has {len(COLUMNS)} (index, image ID, 10 vote counts, "
            "2 tags, challenge)"
        )
    frame.columns = list(COLUMNS)
    votes = frame[list(VOTES)].apply(pd.to_numeric, errors="coerce")
    bad = votes.isna().any(axis=1) | (votes < 0).any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        shown = " ".join(frame.iloc[row, 2:12])
        raise UserError(f"{path}: line {row + 1} has vote counts that are not counts: {shown}")
    counts = votes.to_numpy(dtype=np.float64)
    ratings = np.arange(1, 11, dtype=np.float64)
    total = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):  # an image without votes: no MOS (dropped by prepare)
        mos = counts @ ratings / total
        std = np.sqrt((counts * (ratings[None] - mos[:, None]) ** 2).sum(axis=1) / total)
    table = pd.DataFrame({"image": frame["image_id"].str.strip() + ".jpg", "mos": mos, "std": std})
    for column in VOTES:
        table[column] = votes[column].astype(np.int64)
    for column in ("image_id", "tag_1", "tag_2", "challenge"):
        table[column] = frame[column]
    split = _official_split(path.parent, frame["image_id"].str.strip())
    if split is not None:
        table[OFFICIAL_SPLIT] = split
    columns = {"image": "image ID", "mos": "vote histogram mean", "std": "vote histogram std"}
    return MetaTable(frame=table, source=str(path), columns=columns)


def _official_split(folder: Path, ids):
    """'train'/'test' per image from the lists beside AVA.txt (None when they are not there; NaN: in neither)."""
    lists = {split: folder / LIST_FOLDER / name for split, name in LISTS.items()}
    if not all(p.is_file() for p in lists.values()):
        return None
    assigned: dict[str, str] = {}
    for split, list_path in lists.items():
        require_path(list_path, "AVA image list")
        for line in list_path.read_text().split():
            if assigned.setdefault(line.strip(), split) != split:
                raise UserError(f"{list_path}: image {line.strip()} is in both the train and the test list")
    return ids.map(assigned)


SPEC = DatasetSpec(
    name="ava",
    title="AVA (aesthetics)",
    source_help=f"{FILE_NAME} (or its directory; {LIST_FOLDER}/{LISTS['train']} and {LISTS['test']} beside it give "
    "the official split)",
    reader=read,
    scale=(1.0, 10.0),
    task="aesthetics",
    histogram=VOTES,
)
