"""Datasets of images packed in files: WebDataset shards and Parquet image columns, as units of work.

`iqa score` reads loose images through `iqa_cli.inputs` (one work item per image). A dataset of tens of
millions of images comes packed instead: img2dataset's WebDataset `.tar` shards, Hugging Face datasets'
Parquet files. There the unit of work is a shard or a Parquet row group: listing the dataset reads tar
headers and Parquet footers, never an image, and a run records finished units, not image indices.

Inputs name shards as paths, globs (`shards/*.tar`), brace ranges and lists (`shards/{00000..00999}.tar`,
`{train,test}-*.parquet`), or a `--from` list file of shard paths. Units are in a fixed order: inputs in the
order given, each pattern's matches sorted, the row groups of a file in file order.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iqa_cli.errors import UserError
from iqa_cli.sources import parquet, webdataset

SHARD_SUFFIXES = (".tar",)
PARQUET_SUFFIXES = (".parquet", ".pq")
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass
class SourceFile:
    path: str  # as given or matched
    kind: str  # "tar" | "parquet"
    stem: str  # output name in directory mode: `<stem>.parquet`


@dataclass
class UnitList:
    """The units of one run: unit u is row group `row_group[u]` of `files[file_of[u]]` (-1: the whole tar)."""

    files: list[SourceFile]
    file_of: np.ndarray  # int32 [U]
    row_group: np.ndarray  # int32 [U]
    first_row: np.ndarray  # int64 [U]: row number in its file of the unit's first row (Parquet)
    rows: np.ndarray  # int64 [U]: rows of the unit, -1 where unknown until read (tars)
    image_col: str | None = None
    keep: list[str] = field(default_factory=list)
    keep_types: dict[str, Any] = field(default_factory=dict)  # arrow type of each --keep column
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.file_of)

    def label(self, u: int) -> str:
        """How messages name unit u: the shard, or the file and row group."""
        source = self.files[int(self.file_of[u])]
        return source.path if self.row_group[u] < 0 else f"{source.path} row group {int(self.row_group[u])}"

    def units_of_file(self, f: int) -> np.ndarray:
        return np.flatnonzero(self.file_of == f)

    def known_rows(self) -> int | None:
        """Images in the whole list when every unit says (Parquet), else None (tars are counted by reading)."""
        return None if (self.rows < 0).any() else int(self.rows.sum())

    def fingerprint(self) -> str:
        """sha256 over the unit labels in order: identifies the list of units across runs and machines."""
        digest = hashlib.sha256()
        digest.update(f"{self.image_col}\0{','.join(self.keep)}\0".encode())
        for u in range(len(self)):
            digest.update(self.label(u).encode("utf-8", "surrogateescape") + b"\0")
        return digest.hexdigest()

    def samples(self, u: int) -> Iterator[tuple[str, bytes | None, str | None, dict[str, Any]]]:
        """(name, image bytes or None, error or None, kept values) per sample of unit u, in order.

        Raises:
            webdataset.ShardError: a tar that breaks off or cannot be read (rows yielded so far stand).
        """
        source = self.files[int(self.file_of[u])]
        if source.kind == "tar":
            return webdataset.samples(source.path, self.keep)
        return parquet.samples(source.path, int(self.row_group[u]), int(self.first_row[u]), self.image_col, self.keep)


def is_dataset_input(paths: Sequence[str | Path], from_file: str | Path | None, image_col: str | None) -> bool:
    """Whether the inputs name shards or Parquet image tables (else: loose images, `iqa_cli.inputs`)."""
    names = [os.fspath(p) for p in paths]
    if image_col is not None or any(_dataset_name(n) or _BRACE.search(n) for n in names):
        return True
    return from_file is not None and _list_of_shards(Path(from_file)) is not None


def _dataset_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES + PARQUET_SUFFIXES)


def _list_of_shards(path: Path) -> list[str] | None:
    """The entries of a plain-text --from list when every one is a shard or Parquet file, else None."""
    if path.suffix.lower() in (".csv", ".tsv", *PARQUET_SUFFIXES) or not path.is_file():
        return None
    try:
        entries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return None
    return entries if entries and all(_dataset_name(e) or _BRACE.search(e) for e in entries) else None


def expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b{x,y}` -> a00bx, a00by, a01bx, ... (numeric ranges keep the width of their first bound)."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        step = 1 if int(hi) >= int(lo) else -1
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [pattern[: match.end()] + rest for rest in expand_braces(pattern[match.end() :])]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def expand(pattern: str) -> list[str]:
    """Brace expansion, then glob (sorted) for each expansion that holds wildcards; nothing matched is an error."""
    found: list[str] = []
    for name in expand_braces(pattern):
        if glob.has_magic(name):
            found += sorted(glob.glob(name))
        elif os.path.exists(name):
            found.append(name)
        elif name == pattern:
            raise UserError(f"input not found: {name}")
        else:
            raise UserError(f"input not found: {name} (from the pattern {pattern})")
    if not found:
        raise UserError(f"no files match {pattern}")
    return found


def find_units(
    paths: Sequence[str | Path] = (),
    *,
    from_file: str | Path | None = None,
    image_col: str | None = None,
    keep: Sequence[str] = (),
) -> UnitList:
    """Expands shard and Parquet inputs into the ordered list of units; reads tar headers and Parquet footers.

    Raises:
        UserError: a pattern that matches nothing, a file that is not a tar or not a Parquet file with the
            image column, a --keep column the first shard does not have, a mix with loose images, two inputs
            with the same file name (their directory outputs would collide).
    """
    names = [os.fspath(p) for p in paths]
    if from_file is not None:
        listed = _list_of_shards(Path(from_file))
        if listed is None:
            raise UserError(f"--from {from_file}: shard inputs take a list of .tar or .parquet paths, one per line")
        names += listed
    matched: list[str] = []
    for name in names:
        for path in expand(name):
            if os.path.isdir(path):
                raise UserError(f"{path} is a folder: shard and Parquet inputs cannot be mixed with image folders")
            if not _dataset_name(path):
                raise UserError(f"{path}: shard inputs must all be .tar or .parquet files, not loose images")
            matched.append(path)
    seen: set[str] = set()
    files: list[SourceFile] = []
    stems: dict[str, str] = {}
    warnings = []
    for path in matched:
        real = os.path.realpath(path)
        if real in seen:
            warnings.append(f"{path} was given twice; scored once")
            continue
        seen.add(real)
        kind = "tar" if path.lower().endswith(SHARD_SUFFIXES) else "parquet"
        stem = Path(path).name.rsplit(".", 1)[0]
        if stem in stems:
            raise UserError(f"two inputs are both named {stem} ({stems[stem]} and {path}); rename one")
        stems[stem] = path
        files.append(SourceFile(path, kind, stem))
    kinds = {f.kind for f in files}
    if len(kinds) > 1:
        raise UserError("inputs mix .tar shards and .parquet files; score them in two runs")
    keep = [c for c in keep if c]
    if "tar" in kinds:
        return _tar_units(files, keep, image_col, warnings)
    return _parquet_units(files, keep, image_col or "image", warnings)


def _tar_units(files: list[SourceFile], keep: list[str], image_col: str | None, warnings: list[str]) -> UnitList:
    if image_col is not None:
        raise UserError(f"--image-col {image_col}: WebDataset shards name their image by suffix, not by column")
    for f in files:
        webdataset.check_tar(f.path)
    keep_types: dict[str, Any] = {}
    if keep:
        available, where = webdataset.keep_columns(files[0].path)
        missing = [c for c in keep if c not in available]
        if missing:
            have = ", ".join(available) or "none"
            raise UserError(f"--keep {','.join(missing)}: not found in {where} (columns: {have})")
        keep_types = {c: available[c] for c in keep}
    n = len(files)
    return UnitList(
        files=files,
        file_of=np.arange(n, dtype=np.int32),
        row_group=np.full(n, -1, dtype=np.int32),
        first_row=np.zeros(n, dtype=np.int64),
        rows=np.full(n, -1, dtype=np.int64),
        keep=keep,
        keep_types=keep_types,
        warnings=warnings,
    )


def _parquet_units(files: list[SourceFile], keep: list[str], image_col: str, warnings: list[str]) -> UnitList:
    file_of, row_group, first_row, rows = [], [], [], []
    keep_types: dict[str, Any] = {}
    for i, f in enumerate(files):
        counts, types = parquet.describe(f.path, image_col, keep)
        keep_types = keep_types or types
        for c, t in types.items():
            if t != keep_types[c]:
                raise UserError(f"--keep {c}: {f.path} holds {t}, {files[0].path} holds {keep_types[c]}")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if counts else []
        for g, (count, start) in enumerate(zip(counts, starts, strict=True)):
            file_of.append(i)
            row_group.append(g)
            first_row.append(int(start))
            rows.append(count)
    return UnitList(
        files=files,
        file_of=np.asarray(file_of, dtype=np.int32),
        row_group=np.asarray(row_group, dtype=np.int32),
        first_row=np.asarray(first_row, dtype=np.int64),
        rows=np.asarray(rows, dtype=np.int64),
        image_col=image_col,
        keep=keep,
        keep_types=keep_types,
        warnings=warnings,
    )
