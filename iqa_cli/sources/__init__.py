"""What `iqa score` reads: every kind of input is a `Source` of units, and a unit yields its samples in a fixed order.

A sample is an image or a video (`iqa_cli.video`: its sampled frames are scored); a unit is what a run scores,
writes and resumes as one piece: a WebDataset shard, a Parquet row group, or a run
of consecutive images of a folder, file arguments and a `--from` list. Listing finds the units without reading
an image (folder entries, tar headers, Parquet footers), so a dataset of 100M images lists in seconds and a run's
record of progress holds units, not image indices.

Which source reads an input is decided by its suffix through `SOURCES`, as Hugging Face `datasets` maps file kinds
to its packaged modules: `.tar` -> `webdataset`, `.parquet`/`.pq` -> `parquet`; everything else (folders, image
files, a `--from` list of images) -> `files`. A source module has one function, `open_source(names, options) ->
Source`; adding an input kind is adding one module and one line here (or `register_source` at run time, as
`tests/test_toy_source.py` does).

Inputs of the table's kinds may be paths, globs (`shards/*.tar`) and brace ranges or lists
(`shards/{00000..00999}.tar`, `{train,test}-*.parquet`), or a plain-text `--from` list of such paths. Units are
in a fixed order: inputs in the order given, each pattern's matches sorted, a file's units in file order.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from iqa_cli.errors import UserError

# suffix (lower case) -> the module that reads inputs of that kind; any other input is read by FILES
SOURCES: dict[str, str] = {
    ".tar": "iqa_cli.sources.webdataset",
    ".parquet": "iqa_cli.sources.parquet",
    ".pq": "iqa_cli.sources.parquet",
}
FILES = "iqa_cli.sources.files"
# Table files `--from` reads a column of paths from (never an input kind of their own there).
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".parquet": None, ".pq": None}
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Sample:
    """One thing to score: `name` goes to the output's `image` column; the image (or video) is a file to open
    (`path`) or its encoded bytes (`data`); `error` says why a sample cannot be scored (no image member, null
    bytes)."""

    name: str
    path: str | None = None
    data: bytes | None = None
    error: str | None = None
    kept: dict[str, Any] = field(default_factory=dict)  # values of the source's extra columns (`Source.columns`)
    video: bool = False  # a video (by its suffix, or its bytes' container signature): scored on sampled frames


class SourceError(Exception):
    """A unit that cannot be read to its end (a truncated or corrupt shard): an error of its unit, reported at the
    end of the run; the samples read before it stand."""


@dataclass
class SourceOptions:
    """The options of `iqa score` that say how to read its inputs; a source refuses one that does not apply."""

    from_file: Path | None = None  # --from: a list of inputs (one per line), or a table with a column of paths
    from_column: str | None = None
    root: Path | None = None
    image_col: str | None = None
    keep: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class DataFiles:
    """What the sources of data files (shards, Parquet tables) share: the files in order, each one's `--out DIR/`
    stem, the --keep columns (the source's own columns: `shard` first, then those, with their arrow types), and the
    listing's warnings."""

    paths: list[str]  # as given or matched
    stems: list[str]  # `--out DIR/` file names: `<stem>.parquet`
    keep: list[str] = field(default_factory=list)
    columns: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Source(Protocol):
    """An ordered list of units. Picklable: DataLoader workers call `samples` on their copy."""

    kind: str  # the module's short name, recorded in the run's manifest
    noun: str  # what a unit is, for messages ("shards", "row groups", "images")
    warnings: list[str]  # inputs given twice, unreadable folders, ...
    columns: dict[str, Any]  # output columns beyond the standard ones, in order -> arrow type (None: string)
    # Optional: `may_hold_videos` (bool), whether a sample may be a video: decides the output's video columns
    # before any unit is read (a source without it holds images only).

    def __len__(self) -> int: ...

    def label(self, u: int) -> str:
        """How messages name unit u (the shard; the file and row group; the first image of a run of files)."""
        ...

    def rows(self, u: int) -> int:
        """Samples in unit u; -1 where unknown until read (a tar), then `count_rows` can say."""
        ...

    def count_rows(self, u: int) -> int:
        """Samples in unit u, reading what it takes (a tar's headers): for the progress bar, off the hot path."""
        ...

    def output_stem(self, u: int) -> str:
        """The file unit u goes to under `--out DIR/` (`DIR/<stem>.parquet`); units with one stem share a file."""
        ...

    def num_inputs(self) -> int:
        """How many things `noun` counts, for messages and the output's metadata."""
        ...

    def fingerprint(self) -> str:
        """Identifies the list of units (and what they hold) across runs and machines."""
        ...

    def samples(self, u: int, start: int = 0) -> Iterator[Sample]:
        """The samples of unit u from its `start`-th on, in order.

        Raises:
            SourceError: the unit breaks off; the samples yielded so far stand.
        """
        ...


def register_source(suffix: str, module: str) -> None:
    """Makes inputs ending in `suffix` (".zip") read by `module`'s `open_source`."""
    SOURCES[suffix.lower()] = module


def open_inputs(inputs: Sequence[str | Path], options: SourceOptions) -> Source:
    """The source of a command's inputs: the module `SOURCES` names for their suffix, else `files`.

    Raises:
        UserError: inputs of two kinds, a pattern that matches nothing, an option that does not apply, or what
            the source refuses (a missing file, a tar that is not one, a Parquet file without the image column).
    """
    names = [os.fspath(p) for p in inputs]
    for name in names:  # a list of images given where the images go: what was meant is --from
        if Path(name).suffix.lower() in (".csv", ".tsv", ".txt", ".lst") and os.path.isfile(name):
            raise UserError(f"{name} is a list, not an image: to score the images it names, use --from {name}")
    listed = _listed_inputs(options.from_file)
    if listed is not None:
        names += listed
        options = SourceOptions(None, options.from_column, options.root, options.image_col, options.keep)
    kinds = {name: _kind(name) for name in names}
    chosen = set(kinds.values()) or {FILES}
    if len(chosen) > 1:
        raise UserError(_mix_message(kinds))
    module = chosen.pop()
    if module == FILES and options.image_col is not None:
        raise UserError(f"--image-col {options.image_col}: names the image column of Parquet inputs, not of files")
    if module == FILES and options.keep:
        raise UserError(f"--keep {','.join(options.keep)}: copies columns of shard and Parquet inputs, not of files")
    if module != FILES:
        if options.root is not None or options.from_column is not None:
            flag = "--root" if options.root is not None else "--from-column"
            raise UserError(f"{flag}: applies to image files and --from tables of paths, not to {names[0]}")
        names = [path for name in names for path in expand(name)]
    return importlib.import_module(module).open_source(names, options)


def _kind(name: str) -> str:
    lowered = name.lower()
    for suffix, module in SOURCES.items():
        if lowered.endswith(suffix):
            return module
    return FILES


def _mix_message(kinds: dict[str, str]) -> str:
    by_kind: dict[str, str] = {}
    for name, module in kinds.items():
        by_kind.setdefault(module, name)
    if FILES in by_kind:
        other = next(n for m, n in by_kind.items() if m != FILES)
        what = "is a folder" if os.path.isdir(by_kind[FILES]) else "is not a shard or Parquet file"
        return (
            f"{by_kind[FILES]} {what}: shard and Parquet inputs ({other}) cannot be mixed with image files and "
            "folders; score them in two runs"
        )
    described = " and ".join(f"{Path(n).suffix} files ({n})" for n in by_kind.values())
    return f"inputs mix {described}; score them in two runs"


def _listed_inputs(from_file: Path | None) -> list[str] | None:
    """The entries of a plain-text --from list when every one is an input of a `SOURCES` kind, else None (a list
    of images, or a table of paths: the files source reads it)."""
    if from_file is None:
        return None
    path = Path(from_file)
    if path.suffix.lower() in TABLE_SUFFIXES or not path.is_file():
        return None
    try:
        entries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return None
    return entries if entries and all(_kind(e) != FILES for e in entries) else None


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
    for path in found:
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder: shard and Parquet inputs cannot be mixed with image folders")
    return found


def unique_files(paths: list[str], warnings: list[str]) -> list[tuple[str, str]]:
    """(path, output stem) of each file once, in order; the same file given twice is scored once (a warning).

    Raises:
        UserError: two different files with one stem (their `--out DIR/` files would collide).
    """
    seen: set[str] = set()
    stems: dict[str, str] = {}
    unique = []
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            warnings.append(f"{path} was given twice; scored once")
            continue
        seen.add(real)
        stem = Path(path).name.rsplit(".", 1)[0]
        if stem in stems:
            raise UserError(f"two inputs are both named {stem} ({stems[stem]} and {path}); rename one")
        stems[stem] = path
        unique.append((path, stem))
    return unique
