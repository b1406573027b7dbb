"""`iqa prepare`: a dataset's official metadata -> normalized scores, soft labels, a split -> one Parquet file.

The steps, in order: read the metadata (`iqa_cli.datasets`), drop rows whose name, MOS or std is not usable
(or fail with `strict`), warn about MOS far outside the others, take min/max over the remaining MOS,
normalize to [1, 5], assign train/test (a split file, or a seeded split by reference image where the
dataset has one), optionally check the image files (rows whose image is missing are dropped, or fail with
`strict`; min/max stay those of every usable MOS, so the other rows' labels do not depend on it), build
one-hot and soft labels (`iqa_cli.labels`, the reference rule unless `label_rule="renormalized"`), and write
the Parquet meta of docs/METHOD.md ("Files iqa writes") atomically. A dataset with an official split (AVA's lists,
LSVQ's `is_test`) uses it unless `--split` names another; one rated on a fixed scale (AVA's 1..10) is normalized
by the scale, and `--soft-labels histogram` labels it with its measured vote histogram. The label statistics of
the paper's Tables 1-2 and of the reference `gen_soft_label.py` come back in the result.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from iqa_cli import __version__, labels
from iqa_cli.datasets import DATASETS, OFFICIAL_SPLIT, get_dataset
from iqa_cli.errors import UserError
from iqa_cli.files import atomic_file
from iqa_cli.paths import DATA_DIR_ENV, check_output_dir, check_output_file, resolve_data_dir, write_error
from iqa_cli.prepare_config import SOFT_LABELS, PrepareConfig
from iqa_cli.tasks import check_task

if TYPE_CHECKING:
    import pandas as pd

SPLITS = ("train", "val", "test")
CORE_PARQUET_COLUMNS = ("image", "dataset", "split", "mos", "std", "mos_norm", "std_norm", "level", "soft_label")
FLOAT_METADATA = ("std_threshold", "mean_threshold", "mos_min", "mos_max", "pseudo_std", "test_frac")


@dataclass
class PrepareResult:
    """Where the file went, the summary printed by the CLI (JSON-able), and warnings for stderr."""

    out: Path
    summary: dict
    notes: list[str]


def _validate(config: PrepareConfig) -> None:
    if isinstance(config.levels, bool) or not labels.MIN_LEVELS <= int(config.levels) <= labels.MAX_LEVELS:
        raise UserError(f"--levels must be from {labels.MIN_LEVELS} to {labels.MAX_LEVELS}, got {config.levels}")
    if config.density is not None and config.density not in labels.DENSITIES:
        raise UserError(f"--density must be one of {', '.join(labels.DENSITIES)}, got {config.density!r}")
    for flag, value in (("--std-threshold", config.std_threshold), ("--mean-threshold", config.mean_threshold)):
        if not np.isfinite(value) or value < 0:
            raise UserError(f"{flag} must be a number >= 0, got {value}")
    if config.task is not None:
        check_task(config.task)
    if config.soft_labels not in SOFT_LABELS:
        raise UserError(f"--soft-labels must be one of {', '.join(SOFT_LABELS)}, got {config.soft_labels!r}")
    if config.label_rule not in labels.LABEL_RULES:
        raise UserError(f"--label-rule must be one of {', '.join(labels.LABEL_RULES)}, got {config.label_rule!r}")
    if not 0.0 <= config.test_frac <= 1.0:
        raise UserError(f"--test-frac must be from 0 to 1, got {config.test_frac}")
    if config.pseudo_std is not None and not (np.isfinite(config.pseudo_std) and config.pseudo_std > 0):
        raise UserError(f"--pseudo-std must be a fraction > 0 of the score range, got {config.pseudo_std}")
    opts = config.read_options
    custom_flags = [
        flag
        for flag, value in (
            ("--image-col", opts.image_col),
            ("--mos-col", opts.mos_col),
            ("--std-col", opts.std_col),
            ("--lower-is-better", opts.lower_is_better or None),
        )
        if value is not None
    ]
    if custom_flags and config.dataset.strip().lower() != "custom":
        raise UserError(f"{', '.join(custom_flags)} only apply to the custom dataset, not {config.dataset!r}")


def _numeric(values: pd.Series) -> np.ndarray:
    import pandas as pd

    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _cell(value) -> str:
    """A cell as a message shows it: 'abc', 'nan' (not a number), or 'an empty cell'."""
    import pandas as pd

    if pd.isna(value):  # the readers keep literal 'nan'/'NA' text, so only an empty cell is missing here
        return "an empty cell"
    text = str(value)
    return f"{text!r} (not a number)" if text.strip().lower().lstrip("+-") == "nan" else repr(text)


def _clean(frame: pd.DataFrame, source: str, columns: dict[str, str], strict: bool, notes: list[str]):
    """Numeric MOS/std; unusable rows dropped (counted) or, with strict, reported as an error."""
    mos = _numeric(frame["mos"])
    has_std = "std" in columns
    std = _numeric(frame["std"]) if has_std else np.full(len(frame), np.nan)
    image_ok = frame["image"].notna().to_numpy() & (frame["image"].astype(str).str.len() > 0).to_numpy()
    checks = [
        ("invalid_image", ~image_ok, "image", "a missing image name"),
        ("invalid_mos", ~np.isfinite(mos), "mos", "a non-numeric or missing MOS"),
    ]
    if has_std:
        checks.append(("invalid_std", ~np.isfinite(std), "std", "a non-numeric or missing std"))
    dropped, bad_any = {}, np.zeros(len(frame), dtype=bool)
    for key, bad, col, what in checks:
        bad = bad & ~bad_any  # count each row once, for its first problem
        dropped[key] = int(bad.sum())
        if dropped[key]:
            first = int(np.flatnonzero(bad)[0])
            example = f"{_cell(frame[col].iloc[first])} in data row {first + 1}"
            if col != "image":
                example += f" for image {frame['image'].iloc[first]!r}"
            message = f"{source}: {dropped[key]} row(s) with {what} in column {columns.get(col, col)!r}, e.g. {example}"
            if strict:
                raise UserError(message)
            notes.append(message + "; dropped")
        bad_any |= bad
    negative = has_std & (std < 0) & ~bad_any
    if np.any(negative):
        first = int(np.flatnonzero(negative)[0])
        raise UserError(
            f"{source}: negative std {std[first]:g} in column {columns.get('std', 'std')!r} "
            f"for image {frame['image'].iloc[first]!r}"
        )
    keep = ~bad_any
    frame = frame.loc[keep].reset_index(drop=True)
    frame.attrs["source_row"] = np.flatnonzero(keep) + 1  # 1-based data rows of the table, for messages
    return frame, mos[keep], std[keep], dropped


OUTLIER_GAP = 1.0  # in interquartile ranges; see _mos_outliers


def _mos_outliers(mos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose MOS lies far outside the others: low and high index arrays.

    An extreme value (among the lowest or highest 1% of rows, at least one) is an outlier when a gap of more
    than OUTLIER_GAP interquartile ranges separates it from the rest of the scores. Real rating scales are
    bounded and densely sampled, so their extremes sit within a small fraction of an IQR of each other (a
    normal sample of 10,000 has an extreme gap of ~0.2 IQR; uniform scores of 30 rows ~0.07), while a typo
    such as -2 among 1..5 (gap 3, IQR 2) stands apart. A warning only: the row is kept.
    """
    n = mos.size
    if n < 4:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    q1, q3 = np.percentile(mos, [25, 75])
    iqr = q3 - q1
    if not iqr > 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    m = max(1, n // 100)
    lowest, highest = _sorted_end(mos, m + 1, low=True), _sorted_end(mos, m + 1, low=False)
    low_cut = np.flatnonzero(np.diff(mos[lowest]) > OUTLIER_GAP * iqr)  # [i]: gap after the i-th lowest
    high_cut = np.flatnonzero(np.diff(mos[highest]) > OUTLIER_GAP * iqr)
    low = lowest[: low_cut[-1] + 1] if low_cut.size else lowest[:0]
    high = highest[high_cut[0] + 1 :] if high_cut.size else highest[:0]
    return low, high


def _sorted_end(values: np.ndarray, count: int, low: bool) -> np.ndarray:
    """The first (low) or last `count` indices of `np.argsort(values, kind="stable")`, in that order, from a
    partition and a sort of the values at or beyond the cut only (a stable sort of 1M rows costs 0.1 s)."""
    n = values.size
    cut = np.partition(values, count - 1 if low else n - count)[count - 1 if low else n - count]
    candidates = np.flatnonzero(values <= cut if low else values >= cut)  # ascending rows: ties stay in row order
    ordered = candidates[np.argsort(values[candidates], kind="stable")]
    return ordered[:count] if low else ordered[len(ordered) - count :]


def _outlier_note(frame: pd.DataFrame, source: str, column: str, mos: np.ndarray) -> str | None:
    low, high = _mos_outliers(mos)
    flagged = np.concatenate([low, high])
    if not flagged.size:
        return None
    rows = frame.attrs.get("source_row", np.arange(len(frame)) + 1)
    shown = ", ".join(f"{mos[i]:g} (data row {rows[i]}, image {frame['image'].iloc[i]!r})" for i in flagged[:5])
    more = f" and {flagged.size - 5} more" if flagged.size > 5 else ""
    rest = np.delete(mos, flagged)
    return (
        f"{source}: {flagged.size} MOS value(s) in column {column!r} far outside the others "
        f"({rest.min():g}..{rest.max():g}): {shown}{more}; they set the normalization range to "
        f"[{mos.min():g}, {mos.max():g}], which shifts every label (fix or remove the row if it is a typo)"
    )


def _read_split_file(path: Path) -> dict[str, str]:
    """image name -> split, from DeQA-Score's split.json or a CSV with columns image,split."""
    from iqa_cli.datasets._common import read_csv, require_columns, require_path

    require_path(path, "split file")
    assignments: dict[str, str] = {}

    def assign(name: str, split: str) -> None:
        split = split.strip().lower()
        if split not in SPLITS:
            raise UserError(f"{path}: unknown split {split!r} for image {name!r} (known: {', '.join(SPLITS)})")
        if assignments.setdefault(name, split) != split:
            raise UserError(f"{path}: image {name!r} is in both {assignments[name]!r} and {split!r}")

    if path.suffix.lower() == ".json":
        try:
            content = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(content, dict) or not all(isinstance(v, list) for v in content.values()):
            raise UserError(f'{path}: expected {{"train": [names], "test": [names]}}')
        for split, names in content.items():
            for name in names:
                assign(str(name).strip(), str(split))
    else:
        frame = read_csv(path, dtype=str)
        require_columns(frame, ["image", "split"], path)
        for name, split in zip(frame["image"].fillna(""), frame["split"].fillna(""), strict=True):
            assign(name.strip(), split)
    if not assignments:
        raise UserError(f"{path}: the split file names no images")
    return assignments


def _basenames(images: pd.Series) -> pd.Series:
    return images.str.rsplit("/", n=1).str[-1]


def _apply_split_file(frame: pd.DataFrame, path: Path) -> tuple[pd.Series, int]:
    """Split of each row from the file (by image path or file name); rows the file does not name are dropped."""
    assignments = _read_split_file(path)
    base = _basenames(frame["image"])
    known = set(frame["image"]) | set(base)
    unknown = [name for name in assignments if name not in known]
    if unknown:
        raise UserError(f"{path}: {len(unknown)} image(s) not in the dataset's metadata, e.g. {unknown[0]!r}")
    split = frame["image"].map(assignments)
    split = split.fillna(base.map(assignments))
    return split, int(split.isna().sum())


def group_codes(values: pd.Series) -> tuple[np.ndarray, int]:
    """Each row's group number, groups numbered in order of first appearance (`pd.unique`'s order), and the
    number of groups: one hash pass shared by the duplicate check and the seeded split."""
    import pandas as pd

    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    return codes, len(uniques)


def first_repeat(codes: np.ndarray) -> int | None:
    """The first row whose group (numbered by first appearance, see group_codes) appeared in an earlier row."""
    if codes.size < 2:
        return None
    newest = np.maximum.accumulate(codes)
    repeats = np.flatnonzero(codes[1:] <= newest[:-1])
    return int(repeats[0]) + 1 if repeats.size else None


def seeded_test_rows(
    frame: pd.DataFrame, test_frac: float, seed: int, image_groups: tuple[np.ndarray, int] | None = None
) -> np.ndarray:
    """Rows in the test split: a seeded permutation of the reference images (of the images where there is
    none; `image_groups` is group_codes of the images when already at hand), numbered in order of first
    appearance, the first round(test_frac * groups) of it to test. A boolean table indexed by group number
    gives the rows a set of names and `isin` gave, at a sixth of the cost (benchmarks/bench_prepare.py)."""
    if "ref" in frame:
        codes, n_groups = group_codes(frame["ref"].fillna(frame["image"]))
    else:
        codes, n_groups = image_groups if image_groups is not None else group_codes(frame["image"])
    order = np.random.default_rng(seed).permutation(n_groups)
    in_test = np.zeros(n_groups, dtype=bool)
    in_test[order[: round(test_frac * n_groups)]] = True
    return in_test[codes]


def _split_names(test: np.ndarray) -> pd.Series:
    """'test'/'train' per row, taken from a two-string column (of the string type pandas infers, so the file
    is as before) instead of made as a million Python strings (0.2 s)."""
    import pandas as pd

    return pd.Series(pd.Series(["train", "test"]).array.take(test.astype(np.intp)))


def _resolve_images(images: pd.Series, root: Path) -> tuple[pd.Series, dict[str, int], list[int]]:
    """Paths relative to `root`; a name not found where the metadata puts it is looked up by file name
    (case-insensitive) anywhere under root, and taken when exactly one file matches. Also returns the
    positions of the rows whose image is nowhere."""
    if not root.is_dir():
        raise UserError(f"image directory not found: {root}")
    present: set[str] = set()
    by_name: dict[str, list[str]] = {}
    for folder, _, files in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        for file in files:
            path = file if rel == "." else f"{rel}/{file}"
            present.add(path)
            by_name.setdefault(file.lower(), []).append(path)
    resolved = images.copy()
    found_by_name, missing = 0, []
    for i in np.flatnonzero(~images.isin(present).to_numpy()):
        name = images.iloc[i]
        if (root / name).is_file():  # e.g. behind a symlinked folder that os.walk does not enter
            continue
        candidates = by_name.get(name.rsplit("/", 1)[-1].lower(), [])
        if len(candidates) == 1:
            resolved.iloc[i] = candidates[0]
            found_by_name += 1
        else:
            missing.append(int(i))
    counts = {"found": len(images) - len(missing), "found_by_name": found_by_name, "missing": len(missing)}
    return resolved, counts, missing


def _arrow_column(values: pd.Series):
    import pyarrow as pa

    try:
        return pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed cells from a workbook: keep them as text
        return pa.array(values.astype(str).where(values.notna()), type=pa.string(), from_pandas=True)


def write_meta(frame: pd.DataFrame, soft_label: np.ndarray, metadata: dict[str, str], out: Path) -> None:
    """Writes the rows plus `soft_label` (list<float32>, K) to `out` via a temporary file and a rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, k = soft_label.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    soft = pa.ListArray.from_arrays(offsets, pa.array(soft_label.astype(np.float32).reshape(-1)))
    arrays, names = [], []
    for col in frame.columns:
        arrays.append(_arrow_column(frame[col]))
        names.append(str(col))
    arrays.insert(names.index("level") + 1, soft)
    names.insert(names.index("level") + 1, "soft_label")
    table = pa.Table.from_arrays(arrays, names=names).replace_schema_metadata(metadata)
    if out.is_dir():
        raise UserError(f"--out names a directory: {out}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as tmp:
            pq.write_table(table, tmp)
    except OSError as exc:  # the disk filled up meanwhile: the temporary file is gone, `out` as it was
        exc.filename = exc.filename or str(out)
        raise write_error(exc) or UserError(f"cannot write {out}: {exc.strerror or exc}") from None


def read_meta(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Reads a file written by `iqa prepare`: the rows and the metadata (level names as a list, numbers as floats)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    raw = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    meta: dict = dict(raw)
    if "level_names" in raw:
        meta["level_names"] = json.loads(raw["level_names"])
    for key in FLOAT_METADATA:
        if raw.get(key):
            meta[key] = float(raw[key])
    for key in ("levels", "seed"):
        if raw.get(key):
            meta[key] = int(raw[key])
    if "lower_is_better" in raw:
        meta["lower_is_better"] = raw["lower_is_better"] == "true"
    if "iqa_version" in raw and "label_rule" not in raw:  # written before the rule was recorded: the old default
        meta["label_rule"] = "renormalized"
    return table.to_pandas(), meta


def prepare_dataset(config: PrepareConfig) -> PrepareResult:
    """Runs `iqa prepare` end to end; see the module docstring for the steps."""
    import pandas as pd

    _validate(config)
    spec = get_dataset(config.dataset)
    if config.soft_labels == "histogram" and not (spec.histogram and spec.scale):
        raise UserError(f"--soft-labels histogram: {spec.name} publishes no vote histograms (ava does)")
    k = int(config.levels)
    names = labels.level_names(k, config.level_names)
    density = config.density or spec.density
    name = (config.name or spec.name).strip()
    if not name:
        raise UserError("--name must not be empty")
    out = Path(config.out) if config.out is not None else resolve_data_dir(config.data_dir) / f"{name}.parquet"
    if config.out is not None:  # before any work: a place under a file, not writable, full
        check_output_file(out, "--out", example=f"{name}.parquet")
    else:
        check_output_dir(out.parent, "--data-dir" if config.data_dir is not None else f"data folder (${DATA_DIR_ENV})")
    notes: list[str] = []

    table = spec.reader(Path(config.source), config.read_options)
    if table.frame.empty:
        raise UserError(f"{table.source}: the metadata has no rows")
    frame, mos, std, dropped = _clean(table.frame, table.source, table.columns, config.strict, notes)
    if frame.empty:
        raise UserError(f"{table.source}: no row has a usable image name, MOS and std")
    image_codes, n_images = group_codes(frame["image"])
    duplicates = len(frame) - n_images
    if duplicates:
        first = frame["image"].iloc[first_repeat(image_codes)]
        notes.append(f"{table.source}: {duplicates} duplicate image name(s), e.g. {first!r}; all rows kept")

    outliers = _outlier_note(frame, table.source, table.columns.get("mos", "mos"), mos)
    if outliers:
        notes.append(outliers)
    lo, hi = spec.scale or (float(mos.min()), float(mos.max()))
    if mos.min() < lo or mos.max() > hi:
        raise UserError(f"{table.source}: MOS {mos.min():g}..{mos.max():g} outside the rating scale {lo:g}..{hi:g}")
    if not hi > lo:
        raise UserError(f"{table.source}: all {mos.size} MOS values equal {lo:g}; cannot normalize to [1, 5]")
    lower = spec.lower_is_better or (spec.name == "custom" and config.read_options.lower_is_better)
    pseudo = config.pseudo_std if config.pseudo_std is not None else spec.pseudo_std
    no_std = np.isnan(std)
    if pseudo is not None and no_std.any():
        std = np.where(no_std, pseudo * (hi - lo), std)
        if spec.pseudo_std is None:  # PIPAL's pseudo std is the preset's method, not news
            notes.append(f"{int(no_std.sum())} row(s) without a std use the pseudo std {pseudo:g} x score range")
    elif no_std.all():
        notes.append(f"{table.source} has no std: every soft label is the two-point interpolation (Eq. A2)")

    if config.split is not None:
        split, unnamed = _apply_split_file(frame, Path(config.split))
        dropped["not_in_split"] = unnamed
        if unnamed:
            notes.append(f"{unnamed} image(s) not named in the split file {config.split}; dropped")
        keep = split.notna().to_numpy()
        frame, mos, std, split = frame.loc[keep], mos[keep], std[keep], split[keep]
        frame = frame.reset_index(drop=True)
        split = split.reset_index(drop=True)
        if frame.empty:
            raise UserError(f"{config.split}: no image of the dataset is in the split file")
        split_source = str(config.split)
    elif OFFICIAL_SPLIT in frame.columns:  # the authors' own train/test assignment
        split = frame.pop(OFFICIAL_SPLIT)
        keep = split.notna().to_numpy()
        if not keep.all():
            notes.append(f"{int((~keep).sum())} image(s) in neither official list; dropped")
            frame, mos, std, split = frame.loc[keep].reset_index(drop=True), mos[keep], std[keep], split[keep]
        split, split_source = split.reset_index(drop=True), f"official ({spec.name})"
        dropped["not_in_split"] = int((~keep).sum())
    else:
        split = _split_names(seeded_test_rows(frame, config.test_frac, config.seed, (image_codes, n_images)))
        split_source = f"seeded (test_frac={config.test_frac:g}, seed={config.seed})"

    image_report, image_root = None, ""
    if config.images is not None:
        # stored absolute, so that train/eval find the images from any working directory
        image_root = str(Path(config.images).expanduser().resolve())
        resolved, image_report, missing = _resolve_images(frame["image"], Path(config.images))
        image_report = {"root": image_root, **image_report}
        frame = frame.assign(image=resolved)
        if missing:
            shown = ", ".join(repr(frame["image"].iloc[i]) for i in missing[:3]) + (", ..." if len(missing) > 3 else "")
            message = f"{len(missing)} of {len(frame)} image(s) not found under {config.images}: {shown}"
            if config.strict:
                raise UserError(message)
            if len(missing) == len(frame):
                raise UserError(f"none of the {len(frame)} images found under {config.images}, e.g. {shown}")
            notes.append(f"{message}; their rows are dropped (--strict: an error)")
            keep = np.ones(len(frame), dtype=bool)
            keep[missing] = False
            frame, mos, std = frame.loc[keep].reset_index(drop=True), mos[keep], std[keep]
            split = split[keep].reset_index(drop=True)
        dropped["missing_image"] = len(missing)

    mos_n, std_n = labels.normalize_scores(mos, std, lo=lo, hi=hi, lower_is_better=lower)
    if config.soft_labels == "histogram":
        counts = frame[list(spec.histogram)].to_numpy(dtype=np.float64)
        soft = labels.histogram_soft_labels(counts, lo, hi, k)
    else:
        soft = labels.soft_labels(
            mos_n,
            np.nan_to_num(std_n, nan=0.0),  # no std: the row falls back to the two-point label
            k,
            density=density,
            std_threshold=config.std_threshold,
            mean_threshold=config.mean_threshold,
            rule=config.label_rule,
        )
    # the reference's get_level works on the raw MOS and its min/max (same levels, its rounding at boundaries)
    level = labels.one_hot_levels(mos_n, k) if lower else labels.one_hot_levels(mos, k, lo, hi)
    stats = labels.label_statistics(mos_n, std_n, soft, level)

    extras = frame.drop(columns=[c for c in ("image", "mos", "std") if c in frame.columns])
    extras.columns = [f"{c}_src" if c in CORE_PARQUET_COLUMNS or c == "fallback" else c for c in extras.columns]
    rows = pd.concat(
        [
            pd.DataFrame(
                {
                    "image": frame["image"].astype(str).array,  # no round trip through Python strings
                    "dataset": name,
                    "split": split.astype(str).array,
                    "mos": mos,
                    "std": std,
                    "mos_norm": mos_n,
                    "std_norm": std_n,
                    "level": level.astype(np.int32),
                    "fallback": soft.fallback,
                }
            ),
            extras.reset_index(drop=True),
        ],
        axis=1,
    )
    metadata = {
        "iqa_version": __version__,
        "dataset": name,
        "preset": spec.name,
        "source": table.source,
        "levels": str(k),
        "level_names": json.dumps(names),
        "level_index_base": "0",
        "density": density,
        "std_threshold": repr(float(config.std_threshold)),
        "mean_threshold": repr(float(config.mean_threshold)),
        "label_rule": config.label_rule,
        "image_root": image_root,
        "mos_min": repr(lo),
        "mos_max": repr(hi),
        "lower_is_better": "true" if lower else "false",
        "pseudo_std": repr(float(pseudo)) if pseudo is not None else "",
        "split_source": split_source,
        "test_frac": repr(float(config.test_frac)) if config.split is None else "",
        "seed": str(config.seed) if config.split is None else "",
        "soft_labels": config.soft_labels,
        "task": config.task or spec.task,
    }
    write_meta(rows, soft.probs, metadata, out)

    counts = split.value_counts()
    summary = {
        "dataset": name,
        "preset": spec.name,
        "source": table.source,
        "out": str(out),
        "rows": len(rows),
        "levels": k,
        "level_names": names,
        "density": density,
        "std_threshold": float(config.std_threshold),
        "mean_threshold": float(config.mean_threshold),
        "label_rule": config.label_rule,
        "mos_min": lo,
        "mos_max": hi,
        "lower_is_better": bool(lower),
        "pseudo_std": pseudo,
        "split": {"source": split_source, **{s: int(counts.get(s, 0)) for s in SPLITS if s in counts or s != "val"}},
        "dropped": dropped,
        "images": image_report,
        "labels": stats,
        "soft_labels": config.soft_labels,
        "task": config.task or spec.task,
    }
    return PrepareResult(out=out, summary=summary, notes=notes)


__all__ = ["DATASETS", "PrepareConfig", "PrepareResult", "prepare_dataset", "read_meta", "write_meta"]
