"""What every dataset reader shares: the common table, the spec, and file-reading helpers that fail as one line.

A reader turns one dataset's official metadata file(s) into a `MetaTable`: a DataFrame with columns
`image` (path relative to the image root, as the authors' files name it; a video for the video datasets), `mos`
and `std` (raw values, not yet checked: `iqa prepare` counts and drops non-numeric ones), an optional `ref`
(reference image, for split-by-content), an optional `official_split` (the authors' train/test assignment),
and any dataset-specific extras (AVA's vote counts among them). Pandas is imported inside the functions so that the
registry stays cheap to import for `iqa --help`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from iqa_cli.errors import UserError
from iqa_cli.option_field import option

if TYPE_CHECKING:
    import pandas as pd

CORE_COLUMNS = ("image", "mos", "std")
OFFICIAL_SPLIT = "official_split"  # a reader's column of the authors' own train/test assignment, when they publish one


@dataclass(frozen=True)
class ReadOptions:
    """Options only the `custom` reader uses (the column names of the user's file)."""

    panel: ClassVar[str] = "Input"

    image_col: str | None = option(None, "custom (required there): column of image paths.", metavar="COLUMN")
    mos_col: str | None = option(None, "custom (required there): column of MOS.", metavar="COLUMN")
    std_col: str | None = option(
        None, "custom: column of std [default: none; labels from the MOS alone].", metavar="COLUMN"
    )
    lower_is_better: bool = option(False, "custom: scores are DMOS-like.")


@dataclass
class MetaTable:
    """One dataset's rows in the common layout.

    Attributes:
        frame: columns image, mos, std (+ ref, extras); mos/std raw as read.
        source: the file(s) read, for messages and the Parquet metadata.
        columns: common name -> column name in the source file ("mos" -> "MOS"), for messages.
    """

    frame: pd.DataFrame
    source: str
    columns: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset preset: how to read its official metadata and how to scale its scores.

    Attributes:
        name: preset name on the command line.
        title: human name of the dataset.
        source_help: what `--csv` names (file or directory), shown in `iqa prepare --help`.
        reader: path, options -> MetaTable.
        lower_is_better: scores are DMOS-like and are flipped before normalization.
        density: default soft-label mode ("pdf" for koniq/kadid as the released models, else "cdf").
        pseudo_std: std as a fraction of the MOS range for rows without one (PIPAL: 0.2), else None.
        scale: the rating scale's (lowest, highest) rating, by which scores are normalized instead of the data's
            min/max (AVA: 1..10, so its histograms rescale to 1..5 as they are); None: min/max.
        task: what the scores rate ("quality", "aesthetics"): the prompt a model is trained and scored with.
        histogram: the columns of vote counts, one per rating of the scale in ascending order (AVA's ten), for
            `iqa prepare --soft-labels histogram`; () when the dataset has none.
    """

    name: str
    title: str
    source_help: str
    reader: Callable[[Path, ReadOptions], MetaTable]
    lower_is_better: bool = False
    density: str = "cdf"
    pseudo_std: float | None = None
    scale: tuple[float, float] | None = None
    task: str = "quality"
    histogram: tuple[str, ...] = ()


def require_path(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    return path


def pick_file(path: Path, names: Iterable[str], what: str) -> Path:
    """`path` itself if it is a file, else the first of `names` inside the directory `path`."""
    require_path(path, what)
    if path.is_file():
        return path
    names = list(names)
    for name in names:
        if (path / name).is_file():
            return path / name
    raise UserError(f"{what} not found in directory {path} (looked for {', '.join(names)})")


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """pandas.read_csv with parse failures turned into a one-line UserError naming the file."""
    import pandas as pd

    kwargs.setdefault("encoding", "utf-8-sig")  # a leading byte-order mark would rename the first column
    # only an empty cell is missing: a literal 'nan' or 'NA' stays text, so messages can say what the cell holds
    kwargs.setdefault("keep_default_na", False)
    kwargs.setdefault("na_values", [""])
    try:
        frame = pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: cannot parse as a table: {' '.join(str(exc).split())}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def excel_sheets(path: Path) -> dict[str, pd.DataFrame]:
    """Every sheet of a workbook, no header row assumed (cells as read)."""
    import pandas as pd

    try:
        return pd.read_excel(path, sheet_name=None, header=None, keep_default_na=False, na_values=[""])
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"{path}: cannot read as an xlsx workbook: {' '.join(str(exc).split())}") from None


def frame_with_header(cells: pd.DataFrame, required: Iterable[str], scan_rows: int = 30) -> pd.DataFrame | None:
    """The table below the first row (within `scan_rows`) holding every `required` header; None if absent.

    Workbooks often carry a title block above the header (CSIQ's `all_by_image` has three rows).
    """
    required = [r.lower() for r in required]
    for row in range(min(scan_rows, len(cells))):
        header = [str(v).strip() if v == v and v is not None else "" for v in cells.iloc[row].tolist()]
        lowered = [h.lower() for h in header]
        if all(r in lowered for r in required):
            keep = [i for i, h in enumerate(header) if h]
            body = cells.iloc[row + 1 :, keep].copy()
            body.columns = [header[i] for i in keep]
            return body.dropna(how="all").reset_index(drop=True)
    return None


def require_columns(frame: pd.DataFrame, required: Iterable[str], path: Path | str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        found = ", ".join(map(str, frame.columns)) or "none"
        raise UserError(f"{path}: missing column {', '.join(map(repr, missing))} (columns found: {found})")


def find_column(frame: pd.DataFrame, candidates: Iterable[str]) -> str | None:
    """The first column whose name matches one of `candidates`, ignoring case and surrounding spaces."""
    lowered = {str(c).strip().lower(): c for c in frame.columns}
    for cand in candidates:
        if cand.lower() in lowered:
            return lowered[cand.lower()]
    return None


def find_columns(frame: pd.DataFrame, path: Path | str, what: str, *names: str) -> list[str]:
    """The columns named `names` (case and surrounding spaces ignored), or one line saying what `what` holds."""
    found = [find_column(frame, [name]) for name in names]
    if None in found:
        columns = ", ".join(map(str, frame.columns)) or "none"
        raise UserError(f"{path}: {what} have columns {' and '.join(names)} (columns found: {columns})")
    return found


def load_csv(path: Path, file_name: str, what: str, required: Iterable[str]) -> tuple[Path, pd.DataFrame]:
    """The dataset's CSV (`path`, or `file_name` inside the directory `path`), checked for `required` columns."""
    path = pick_file(path, [file_name], what)
    frame = read_csv(path)
    require_columns(frame, required, path)
    return path, frame


def csv_reader(
    file_name: str, what: str, *, image: str, mos: str, std: str | None
) -> Callable[[Path, ReadOptions], MetaTable]:
    """A reader for a one-header-row CSV that names its image, MOS and std columns as given."""

    def read(path: Path, options: ReadOptions) -> MetaTable:
        path, frame = load_csv(path, file_name, what, [c for c in (image, mos, std) if c is not None])
        return common_table(frame, path, image=image, mos=mos, std=std)

    return read


def common_table(
    frame: pd.DataFrame,
    source: Path | str,
    *,
    image: str,
    mos: str,
    std: str | None,
    ref: str | None = None,
    drop: Iterable[str] = (),
) -> MetaTable:
    """Renames the file's columns to the common ones; every other column is kept as an extra."""
    import numpy as np
    import pandas as pd

    names = frame[image].astype(str).str.strip().where(frame[image].notna())  # a missing name stays missing
    out = pd.DataFrame({"image": names, "mos": frame[mos]})
    out["std"] = frame[std] if std is not None else np.nan
    if ref is not None:
        out["ref"] = frame[ref].astype(str)
    used = {image, mos, std, ref, *drop}
    for col in frame.columns:
        if col not in used and col not in out.columns:
            out[col] = frame[col]
    columns = {"image": image, "mos": mos}
    if std is not None:
        columns["std"] = std
    return MetaTable(frame=out.reset_index(drop=True), source=str(source), columns=columns)
