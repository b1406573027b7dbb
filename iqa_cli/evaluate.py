"""`iqa eval`: join predictions with human scores on the image path and compute the metrics.

Predictions are what `iqa score` writes (Parquet; CSV and JSONL also read): `image`, `score`, `std`,
`error`, optional `score_reg`. Ground truth is a meta written by `iqa prepare` (Parquet: `image`
relative to the image root stored in its key-value metadata, `dataset`, `split`, `mos`, `std`,
`mos_norm`, `std_norm`, ...) or a CSV with at least `image` and `mos` (optional `std`, `dataset`,
`split`, `mos_norm`, `std_norm`).

Predictions may be one file or an `iqa score --out DIR/` folder: its Parquet files (`part-00000.parquet`, ...
or one per shard) are read as one table, with the run's metadata from `DIR/_iqa.json`.

Paths in predictions are whatever the user gave `iqa score` (absolute, or relative to where it ran), so
rows are joined in four passes, each only on rows the previous left over: (1) the same normalized
path; (2) the same absolute path, with ground-truth paths under the meta's image root and prediction
paths under the current directory; (3) the longest path suffix (whole components) shared with exactly
one ground-truth image; (4) keys: a prediction named without an image extension (a WebDataset member's
`__key__`, `img0000`; a Parquet input's name) is the ground-truth image whose path without its extension
ends with it (`img0000.png`, `images/img0000.jpg`), whole components, as in (3); a key that names several
ground-truth images (`img0000.png` and `img0000.jpg`) is refused in one line, as the join would be a guess.
Nothing is dropped silently: the report counts (and names a few of) predictions without ground truth,
ground-truth images without prediction, ambiguous and duplicate predictions, and predictions that failed
(`error` set or no score).

Scale: correlations and the logistic fit use `mos_norm` (the [1, 5] scale of the predictions) when the
ground truth has it, else `mos` as given; RMSE and the Gaussian gaps compare on that same scale, with the
human std `std_norm` (or `std` next to a raw `mos`).
"""

import json
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from iqa_cli.errors import UserError
from iqa_cli.files import atomic_write
from iqa_cli.metrics import MIN_CORRELATION_ROWS, Metrics, compute_metrics

PREDICTION_COLUMNS = ("score", "score_reg")
SPLITS = ("test", "train", "all")
# Key-value metadata keys (last dotted component, lower case) that may hold the meta's image root.
IMAGE_ROOT_KEYS = ("image_root", "images_root", "image_dir", "images_dir", "images", "root")
EXAMPLES = 5  # names shown per category of unmatched rows
POOLED = "all"  # name of the row pooling every dataset

# How a prediction row found its ground truth (or why not).
UNMATCHED, EXACT, ABSOLUTE, SUFFIX, DUPLICATE, AMBIGUOUS, KEY = range(7)
MATCH_NAMES = {EXACT: "exact", ABSOLUTE: "image_root", SUFFIX: "suffix", KEY: "key"}
DIRECTORY_METADATA = "_iqa.json"  # an `iqa score --out DIR/` folder's metadata (scoring/output.py)


# --- reading -------------------------------------------------------------------------------------


def _detect_format(path: Path, role: str) -> str:
    if not path.exists():
        raise UserError(f"{role} file not found: {path}")
    if path.is_dir():
        if not _folder_files(path):
            raise UserError(
                f"{role} folder {path} holds no .parquet file (a file, or an `iqa score --out DIR/` folder, is read)"
            )
        return "folder"
    with path.open("rb") as handle:
        head = handle.read(4)
    suffix = path.suffix.lower()
    if head == b"PAR1" or suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise UserError(f"{role} file {path} is not a Parquet or CSV file (expected .parquet or .csv)")


def _flatten_metadata(raw: dict[bytes, bytes] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key_bytes, value_bytes in (raw or {}).items():
        key = key_bytes.decode("utf-8", "replace")
        if key in ("pandas", "ARROW:schema"):
            continue
        value = value_bytes.decode("utf-8", "replace")
        out[key] = value
        try:
            nested = json.loads(value)
        except ValueError:
            continue
        if isinstance(nested, dict):
            out.update({f"{key}.{k}": str(v) for k, v in nested.items() if not isinstance(v, (dict, list))})
    return out


def _folder_files(folder: Path) -> list[Path]:
    """The Parquet files of an `iqa score --out DIR/` folder, in name order (`_iqa.json` and hidden files aside)."""
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(("_", ".")) and p.is_file())


def _read_folder(folder: Path, role: str, columns: list[str] | None) -> tuple[pd.DataFrame, dict[str, str]]:
    """Every Parquet file of an `iqa score --out DIR/` folder as one table, and the run's `DIR/_iqa.json`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _folder_files(folder)
    schemas = [pq.read_schema(f) for f in files]
    names = list(dict.fromkeys(n for schema in schemas for n in schema.names))
    wanted = None if columns is None else [c for c in columns if c in names]
    tables = [pq.read_table(f, columns=[c for c in wanted if c in sc.names] if wanted is not None else None)
              for f, sc in zip(files, schemas, strict=True)]  # fmt: skip
    table = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    table.attrs["all_columns"] = names
    metadata: dict[str, str] = {}
    run_file = folder / DIRECTORY_METADATA
    if run_file.is_file():
        metadata = _flatten_metadata({k.encode(): str(v).encode() for k, v in json.loads(run_file.read_text()).items()})
    elif role == "predictions":
        table.attrs["note"] = (
            f"{folder} has no {DIRECTORY_METADATA}: its run may not have finished; its {len(files)} Parquet "
            "file(s) are read as they are"
        )
    return table, metadata


def read_table(path: Path, role: str, columns: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """Reads a Parquet/CSV/JSONL table, or the Parquet files of an `iqa score --out DIR/` folder (only `columns`
    that exist, if given), and its key-value metadata.

    Raises UserError naming the file for anything unreadable.
    """
    path = Path(path)
    kind = _detect_format(path, role)
    metadata: dict[str, str] = {}
    try:
        if kind == "folder":
            table, metadata = _read_folder(path, role, columns)
        elif kind == "parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            metadata = _flatten_metadata(schema.metadata)
            wanted = None if columns is None else [c for c in columns if c in schema.names]
            table = pq.read_table(path, columns=wanted).to_pandas()
            if wanted is not None and not wanted:
                table = pd.DataFrame(index=range(pq.ParquetFile(path).metadata.num_rows))
            table.attrs["all_columns"] = list(schema.names)
        elif kind == "csv":
            table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype={"image": str})
            table.attrs["all_columns"] = list(table.columns)
        else:
            table = pd.read_json(path, lines=True, dtype={"image": str})
            table.attrs["all_columns"] = list(table.columns)
    except UserError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        label = {"parquet": "Parquet", "csv": "CSV", "jsonl": "JSON lines", "folder": "Parquet files"}[kind]
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"cannot read {role} file {path} as {label}: {detail}") from exc
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/ArrowException types
        if type(exc).__module__.startswith("pyarrow"):
            detail = " ".join(str(exc).split())[:200]
            raise UserError(f"cannot read {role} file {path} as Parquet: {detail}") from exc
        raise
    return table, metadata


def _require_columns(table: pd.DataFrame, path: Path, role: str, required: tuple[str, ...]) -> None:
    found = table.attrs.get("all_columns", list(table.columns))
    missing = [c for c in required if c not in found]
    if missing:
        listed = ", ".join(map(str, found)) or "none"
        raise UserError(f"{role} file {path} has no column {', '.join(map(repr, missing))} (columns found: {listed})")


def image_root_from_metadata(metadata: dict[str, str]) -> str | None:
    """The image root a meta records, under any of IMAGE_ROOT_KEYS (possibly nested in a JSON value)."""
    by_leaf: dict[str, str] = {}
    for key, value in metadata.items():
        leaf = key.replace(":", ".").replace("/", ".").rsplit(".", 1)[-1].lower()
        by_leaf.setdefault(leaf, value)
    for name in IMAGE_ROOT_KEYS:
        if by_leaf.get(name):
            return by_leaf[name]
    return None


# --- joining -------------------------------------------------------------------------------------


def normalize_image_path(path: str) -> str:
    """POSIX separators, no `.`/`..` components or doubled slashes; absolute paths stay absolute."""
    path = str(path).replace("\\", "/")
    if "//" in path or "/." in path or path.startswith(".") or path.endswith("/"):
        return posixpath.normpath(path)
    return path  # already normal: skips normpath for the common case


def _under(base: str, path: str) -> str:
    return path if path.startswith("/") else normalize_image_path(f"{base.rstrip('/')}/{path}")


@dataclass
class ImageMatch:
    """For each prediction row, the ground-truth row it belongs to (-1: none) and how it was found."""

    gt_index: np.ndarray  # [P] int64
    how: np.ndarray  # [P] int8, one of UNMATCHED, EXACT, ABSOLUTE, SUFFIX, DUPLICATE, AMBIGUOUS


def _suffix_keys(parts: pd.Series, k: int) -> pd.Series:
    """The last k path components joined by "/", NaN where a path has fewer."""
    return parts.str[-k:].str.join("/").where(parts.str.len() >= k)


def match_images(
    pred_images: Sequence[str | None], gt_images: Sequence[str], roots: Sequence[str] = (), cwd: str | None = None
) -> ImageMatch:
    """Matches prediction paths to ground-truth paths (exact, then under `roots`, then unique suffix)."""
    n_pred = len(pred_images)
    gt_index = np.full(n_pred, -1, dtype=np.int64)
    how = np.full(n_pred, UNMATCHED, dtype=np.int8)
    valid = [isinstance(p, str) and p != "" for p in pred_images]
    preds = [normalize_image_path(p) if ok else "" for p, ok in zip(pred_images, valid, strict=True)]
    gts = [normalize_image_path(g) for g in gt_images]

    def assign(lookup: dict[str, int], keys: list[str], method: int) -> None:
        found = pd.Series(keys, dtype=object).map(lookup)
        hit = found.notna().to_numpy() & (how == UNMATCHED) & np.asarray(valid, dtype=bool)
        gt_index[hit] = found[hit].astype(np.int64).to_numpy()
        how[hit] = method

    exact: dict[str, int] = {}
    for row, g in enumerate(gts):
        exact.setdefault(g, row)
    assign(exact, preds, EXACT)

    if (how == UNMATCHED).any() and roots:
        cwd = cwd or os.getcwd()
        absolute: dict[str, int] = {}
        for root in roots:
            base = normalize_image_path(root)
            for row, g in enumerate(gts):
                absolute.setdefault(_under(base, g), row)
        base = normalize_image_path(cwd)
        assign(absolute, [_under(base, p) if p else "" for p in preds], ABSOLUTE)

    # Longest shared suffix first; a row is decided at the first length where its suffix is known.
    pending = (how == UNMATCHED) & np.asarray(valid, dtype=bool)
    if pending.any() and gts:
        gt_parts = pd.Series(gts, dtype=object).str.split("/")
        pred_parts = pd.Series(preds, dtype=object).str.split("/")
        for k in range(int(gt_parts.str.len().max()), 0, -1):
            rows = np.flatnonzero(pending)
            if rows.size == 0:
                break
            gt_keys = _suffix_keys(gt_parts, k).dropna()
            owner = pd.Series(np.where(gt_keys.duplicated(keep=False), -1, gt_keys.index), index=gt_keys.to_numpy())
            owner = owner[~owner.index.duplicated()]  # -1: shared by several ground-truth images
            found = _suffix_keys(pred_parts.iloc[rows], k).map(owner).to_numpy(dtype=np.float64)
            known = ~np.isnan(found)
            unique = known & (found >= 0)
            gt_index[rows[unique]] = found[unique].astype(np.int64)
            how[rows[unique]] = SUFFIX
            how[rows[known & (found < 0)]] = AMBIGUOUS
            pending[rows[known]] = False

    pending = (how == UNMATCHED) & np.asarray(valid, dtype=bool) & ~np.asarray([_has_image_suffix(p) for p in preds])
    if pending.any() and gts:
        _match_keys(preds, gts, pending, gt_index, how)

    # One prediction per ground-truth image: the best match (then the first row) wins.
    matched = np.flatnonzero(gt_index >= 0)
    order = matched[np.lexsort((matched, how[matched]))]
    _, first = np.unique(gt_index[order], return_index=True)
    losers = np.setdiff1d(order, order[first])
    gt_index[losers], how[losers] = -1, DUPLICATE
    return ImageMatch(gt_index=gt_index, how=how)


def _has_image_suffix(path: str) -> bool:
    from iqa_cli.images import IMAGE_EXTENSIONS

    return posixpath.splitext(path.rsplit("/", 1)[-1])[1].lower() in IMAGE_EXTENSIONS


def _match_keys(preds: list[str], gts: list[str], pending: np.ndarray, gt_index: np.ndarray, how: np.ndarray) -> None:
    """Pass 4: keys without an image extension against the ground-truth paths without theirs, the longest shared
    suffix of whole components first; a key naming several images is refused."""
    stems = pd.Series([posixpath.splitext(g)[0] if _has_image_suffix(g) else "" for g in gts], dtype=object)
    gt_parts = stems.str.split("/").where(stems != "")
    pred_parts = pd.Series(preds, dtype=object).str.split("/")
    longest = int(gt_parts.dropna().str.len().max()) if gt_parts.notna().any() else 0
    for k in range(longest, 0, -1):
        rows = np.flatnonzero(pending)
        if rows.size == 0:
            return
        gt_keys = _suffix_keys(gt_parts.dropna(), k).dropna()
        keys = _suffix_keys(pred_parts.iloc[rows], k)
        shared = gt_keys[gt_keys.duplicated(keep=False)]
        clash = keys[keys.isin(set(shared))]
        if len(clash):
            key = clash.iloc[0]
            named = [gts[i] for i in shared[shared == key].index[:2]]
            raise UserError(
                f"prediction key {preds[clash.index[0]]!r} names {int((shared == key).sum())} ground-truth images "
                f"({', '.join(named)}): a key joins the image whose path without its extension ends with it, and "
                "must name one; give images unique names (without their extensions) in the ground truth"
            )
        owner = pd.Series(gt_keys.index, index=gt_keys.to_numpy())
        found = keys.map(owner).to_numpy(dtype=np.float64)
        known = ~np.isnan(found)
        gt_index[rows[known]] = found[known].astype(np.int64)
        how[rows[known]] = KEY
        pending[rows[known]] = False


# --- the report ----------------------------------------------------------------------------------


@dataclass
class GroupResult:
    """Metrics of one dataset (or of all datasets pooled)."""

    name: str
    metrics: Metrics


@dataclass
class EvalReport:
    """Everything `iqa eval` prints and writes; `matched` holds the scored rows (for plots)."""

    predictions: str
    ground_truth: str | None
    column: str
    split: str
    target: str  # ground-truth column the predictions are compared with: mos_norm or mos
    results: list[GroupResult]
    counts: dict[str, int]
    matched_by: dict[str, int]
    examples: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)
    matched: pd.DataFrame | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "predictions": self.predictions,
            "ground_truth": self.ground_truth,
            "column": self.column,
            "split": self.split,
            "target": self.target,
            "counts": self.counts,
            "matched_by": self.matched_by,
            "examples": self.examples,
            "results": [{"dataset": g.name, **g.metrics.to_dict()} for g in self.results],
            "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def write_json(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self.to_json())  # complete or absent, even when the disk fills up


def _resolve_split(gt: pd.DataFrame, split: str | None, source: str) -> str:
    has_split = "split" in gt.columns
    values = gt["split"].astype(str).str.strip().str.lower() if has_split else None
    if split is None:
        return "test" if has_split and (values == "test").any() else "all"
    if split == "all":
        return split
    if not has_split:
        raise UserError(f"ground truth {source} has no `split` column; use --split all")
    if not (values == split).any():
        found = ", ".join(sorted(values.unique())) or "none"
        raise UserError(f"ground truth {source} has no rows with split {split!r} (splits found: {found})")
    return split


def _examples(values) -> list[str]:
    return [str(v) for v in list(values)[:EXAMPLES]]


def _failed_mask(preds: pd.DataFrame, column: str) -> np.ndarray:
    failed = pd.to_numeric(preds[column], errors="coerce").isna().to_numpy()
    if "error" in preds.columns:
        error = preds["error"]
        failed = failed | (error.notna() & (error.astype(str).str.strip() != "")).to_numpy()
    return failed


def evaluate(
    predictions: Path,
    ground_truth: Path | None = None,
    *,
    split: str | None = None,
    column: str = "score",
    cwd: Path | None = None,
) -> EvalReport:
    """Joins predictions with ground truth and computes metrics per dataset and pooled.

    Args:
        predictions: the file `iqa score` wrote.
        ground_truth: a meta from `iqa prepare` or a CSV (image, mos, ...); None to use ground-truth
            columns (mos / mos_norm / std_norm / dataset / split) found in the predictions file.
        split: test, train or all; None picks test when the ground truth has test rows, else all.
        column: prediction column to evaluate, score or score_reg (Gaussian gaps only for score).
        cwd: where relative prediction paths are anchored (default: the current directory).
    """
    predictions = Path(predictions)
    if column not in PREDICTION_COLUMNS:
        raise UserError(f"--column must be one of {', '.join(PREDICTION_COLUMNS)}, got {column!r}")
    if split is not None and split not in SPLITS:  # before the tables are read
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    gt_columns = ["image", "dataset", "split", "mos", "mos_norm", "std", "std_norm"]
    pred_columns = ["image", column, "std", "error", "frame"]
    if ground_truth is None:
        pred_columns += [c for c in gt_columns if c not in pred_columns]
    preds, _ = read_table(predictions, "predictions", pred_columns)
    _require_columns(preds, predictions, "predictions", ("image", column))
    notes: list[str] = [preds.attrs["note"]] if "note" in preds.attrs else []
    if "frame" in preds.columns:  # `iqa score --per-frame`: a video is evaluated by its own row, not its frames'
        frames = preds["frame"].notna()
        if frames.any():
            notes.append(f"{int(frames.sum())} rows of single video frames (--per-frame) left out")
        preds = preds[~frames].drop(columns="frame").reset_index(drop=True)

    if ground_truth is None:
        if not {"mos", "mos_norm"} & set(preds.columns):
            raise UserError(f"{predictions} holds no ground truth (no mos/mos_norm column); pass --gt META.parquet|CSV")
        gt = preds.drop(columns=[c for c in (column, "std", "error") if c in preds.columns])
        roots: list[str] = []
        source = str(predictions)
    else:
        ground_truth = Path(ground_truth)
        gt, metadata = read_table(ground_truth, "ground truth", gt_columns)
        _require_columns(gt, ground_truth, "ground truth", ("image", "mos"))
        source = str(ground_truth)
        roots = []
        root = image_root_from_metadata(metadata)
        if root:
            roots.append(os.path.abspath(root))
            if not os.path.isabs(root):
                roots.append(os.path.abspath(ground_truth.parent / root))
    if gt.empty:
        raise UserError(f"ground truth {source} has no rows")
    if preds.empty:
        raise UserError(f"predictions file {predictions} has no rows")
    gt = gt.reset_index(drop=True)
    preds = preds.reset_index(drop=True)

    split = _resolve_split(gt, split, source)
    in_split = np.ones(len(gt), dtype=bool)
    if split != "all":
        in_split = (gt["split"].astype(str).str.strip().str.lower() == split).to_numpy()
    repeated = gt["image"].astype(str).map(normalize_image_path).duplicated().to_numpy()
    if ground_truth is not None and repeated.any():
        notes.append(f"{int(repeated.sum())} ground-truth rows repeat an image of an earlier row and are ignored")
        in_split &= ~repeated

    if ground_truth is None:
        match = ImageMatch(gt_index=np.arange(len(preds)), how=np.full(len(preds), EXACT, dtype=np.int8))
    else:
        anchor = str(cwd) if cwd else None
        match = match_images(preds["image"].tolist(), gt["image"].astype(str).tolist(), roots, anchor)

    has_gt = match.gt_index >= 0
    if not has_gt.any():
        raise UserError(
            f"no image in {predictions} matches {source} (predictions look like {preds['image'].iloc[0]!r}, "
            f"ground truth like {gt['image'].iloc[0]!r})"
        )
    failed = _failed_mask(preds, column)
    gt_of_pred = np.where(has_gt, match.gt_index, 0)
    pred_in_split = has_gt & in_split[gt_of_pred]
    scored = pred_in_split & ~failed
    outside_split = has_gt & ~in_split[gt_of_pred]
    covered = np.zeros(len(gt), dtype=bool)
    covered[match.gt_index[has_gt]] = True
    missing = in_split & ~covered

    unmatched_rows = np.flatnonzero(match.how == UNMATCHED)
    counts = {
        "predictions": len(preds),
        "ground_truth": int(in_split.sum()),
        "matched": int(pred_in_split.sum()),
        "scored": int(scored.sum()),
        "failed": int((pred_in_split & failed).sum()),
        "unmatched_predictions": int(unmatched_rows.size),
        "ambiguous_predictions": int((match.how == AMBIGUOUS).sum()),
        "duplicate_predictions": int((match.how == DUPLICATE).sum()),
        "missing_predictions": int(missing.sum()),
        "outside_split": int(outside_split.sum()),
    }
    matched_by = {name: int((match.how[pred_in_split] == code).sum()) for code, name in MATCH_NAMES.items()}
    examples = {
        "unmatched_predictions": _examples(preds["image"].iloc[unmatched_rows]),
        "ambiguous_predictions": _examples(preds["image"].iloc[np.flatnonzero(match.how == AMBIGUOUS)]),
        "duplicate_predictions": _examples(preds["image"].iloc[np.flatnonzero(match.how == DUPLICATE)]),
        "missing_predictions": _examples(gt["image"].iloc[np.flatnonzero(missing)]),
        "failed": _examples(preds["image"].iloc[np.flatnonzero(pred_in_split & failed)]),
    }
    if counts["scored"] < MIN_CORRELATION_ROWS:
        raise UserError(
            f"only {counts['scored']} scored predictions in {predictions} match split {split!r} of {source} "
            f"(need at least {MIN_CORRELATION_ROWS}; {counts['failed']} failed, "
            f"{counts['outside_split']} in other splits)"
        )

    # Scale of the comparison: normalized [1, 5] where the ground truth has it.
    target = "mos_norm" if "mos_norm" in gt.columns and gt["mos_norm"].notna().any() else "mos"
    target_std = "std_norm" if target == "mos_norm" else ("std" if ground_truth is not None else None)
    if target == "mos":
        notes.append("ground truth has no mos_norm: RMSE and KL/JS/W2 compare the predictions with mos as given")
    rows = np.flatnonzero(scored)
    gt_rows = match.gt_index[rows]
    table = pd.DataFrame(
        {
            "image": preds["image"].to_numpy()[rows],
            "dataset": gt["dataset"].astype(str).to_numpy()[gt_rows] if "dataset" in gt.columns else POOLED,
            "pred": pd.to_numeric(preds[column], errors="coerce").to_numpy(np.float64)[rows],
            "target": pd.to_numeric(gt[target], errors="coerce").to_numpy(np.float64)[gt_rows],
        }
    )
    with_std = column == "score" and "std" in preds.columns and target_std in gt.columns
    if with_std:
        table["pred_std"] = pd.to_numeric(preds["std"], errors="coerce").to_numpy(np.float64)[rows]
        table["target_std"] = pd.to_numeric(gt[target_std], errors="coerce").to_numpy(np.float64)[gt_rows]
    elif column == "score_reg":
        notes.append("KL/JS/W2 are reported for --column score only (score_reg has no predicted std)")

    def group_metrics(part: pd.DataFrame) -> Metrics:
        return compute_metrics(
            part["pred"].to_numpy(),
            part["target"].to_numpy(),
            part["pred_std"].to_numpy() if with_std else None,
            part["target_std"].to_numpy() if with_std else None,
        )

    datasets = sorted(table["dataset"].unique())
    results = [GroupResult(name, group_metrics(table[table["dataset"] == name])) for name in datasets]
    if len(datasets) > 1:
        results.append(GroupResult(POOLED, group_metrics(table)))
        if target == "mos":
            notes.append(f"the {POOLED!r} row pools raw mos of {len(datasets)} datasets (scales may differ)")
    return EvalReport(
        predictions=str(predictions),
        ground_truth=None if ground_truth is None else str(ground_truth),
        column=column,
        split=split,
        target=target,
        results=results,
        counts=counts,
        matched_by=matched_by,
        examples=examples,
        notes=notes,
        matched=table,
    )
