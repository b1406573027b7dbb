"""Finding the images (and videos) `iqa score` reads: folders, single files and lists, in a deterministic order.

A folder walk takes files with an image suffix (`iqa_cli.images.IMAGE_EXTENSIONS`) or a video suffix
(`iqa_cli.video.VIDEO_EXTENSIONS`); a file given by name or listed is a video when its suffix says so, else an
image.

Every input image gets two strings: the path to open and the *name* written to the output's `image`
column. Names are chosen so that score files join with `iqa prepare` metas, whose `image` column is the
path relative to the image root:

- an image found under a folder argument is named by its path relative to that folder
  (`iqa score /data/koniq/1024x768` -> `826373.jpg`, `sub/a.png`);
- a file argument is named as given on the command line (`photos/a.jpg`);
- a `--from` list entry is named exactly as written in the list (the meta's own `image` values);
- with `--root DIR`, relative list entries are opened under DIR, and every image that lies under DIR is
  named by its path relative to DIR (so `iqa score --from meta.parquet --root /data/koniq` and
  `iqa score /data/koniq --root /data/koniq` name images the same way).

Names use `/` separators. Order: positional inputs in the order given, each folder walked depth-first with
the entries of every directory sorted by name (Unicode code points of the NFC form, independent of locale
and file system), then the `--from` entries in list order. The same command on the same files gives the
same order on any machine.

One file reached twice (the same path given twice, a file given next to the folder it is in, `./a.jpg` and
`a.jpg`, a folder reached through a symbolic link, a link next to its target in a walked folder) is scored
once, under the name it got first, and a warning says how many were dropped. Files are compared by resolved
path (`os.path.realpath`): folders are resolved once each, and only walk entries that are links (known from
the directory listing) and files given on the command line are resolved one by one, so millions of inputs
cost no extra system call per file. A `--from` entry that is itself a link to another entry stays a second
input (finding out would cost an lstat per entry); a hard link is another file.

The list is kept as one packed UTF-8 buffer plus offsets (not a Python list of strings): DataLoader
workers fork from the main process, and ten million Python strings would be copied into every worker page
by page as their reference counts change.

The source's units are runs of consecutive images (`files_per_unit`): few enough files to write, small enough
that a short run still gives every DataLoader worker a unit and a long one writes its rows as it goes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import unicodedata
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from iqa_cli.errors import UserError
from iqa_cli.images import IMAGE_EXTENSIONS
from iqa_cli.process import MAX_WORKERS
from iqa_cli.sources import TABLE_SUFFIXES, Sample, SourceOptions
from iqa_cli.video import VIDEO_EXTENSIONS, is_video_name

# Column names tried, in order, when a `--from` table does not name its path column.
PATH_COLUMNS = ("image", "path", "file")
# A unit is a run of consecutive images: about UNITS_PER_RUN of them per run, each of MIN..MAX images.
MIN_FILES_PER_UNIT, MAX_FILES_PER_UNIT, UNITS_PER_RUN = 16, 4096, 64
_WALKED = frozenset(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)


class PackedStrings:
    """An immutable sequence of strings stored as one UTF-8 buffer and int64 offsets.

    Strings may hold lone surrogates (undecodable file-name bytes); they round-trip via `surrogateescape`.
    """

    def __init__(self, strings: Iterable[str]):
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


@dataclass
class InputList:
    """The images of one run: `names[i]` goes to the `image` column, `path(i)` is what is opened."""

    names: PackedStrings
    base_ids: np.ndarray  # int32 [N], index into `bases`
    bases: list[str]  # folder a name is relative to ("" = the name is the path itself)
    warnings: list[str] = field(default_factory=list)  # folders that could not be read, duplicates dropped

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return self.names[i]

    def path(self, i: int) -> str:
        base = self.bases[int(self.base_ids[i])]
        name = self.names[i]
        return os.path.join(base, name) if base else name

    def fingerprint(self) -> str:
        """sha256 over the names in order: identifies the list of work items across runs and machines."""
        digest = hashlib.sha256()
        digest.update(np.int64(len(self)).tobytes())
        digest.update(self.names.offsets.tobytes())
        digest.update(self.names.buffer.tobytes())
        return digest.hexdigest()


def files_per_unit(n: int) -> int:
    """Images per unit of a run of n: about UNITS_PER_RUN units, each of MIN_FILES_PER_UNIT..MAX_FILES_PER_UNIT,
    and at least MAX_WORKERS units (fewer images per unit) while n allows.

    A function of n alone, so the same inputs give the same units on any machine and with any worker count
    (resume matches units by number). 64 units keep up to 64 DataLoader workers busy; 16 images make a unit
    worth its own file, but a short run is cut finer so that each of a rank's default workers (at most
    MAX_WORKERS) gets a unit; 4096 keep a 10M-image run at ~2,500 files. A slow model writes a long unit in pieces.
    """
    small = min(MIN_FILES_PER_UNIT, n // MAX_WORKERS)  # a short run: at least MAX_WORKERS units
    return max(1, min(MAX_FILES_PER_UNIT, max(small, -(-n // UNITS_PER_RUN))))


@dataclass
class FileSource:
    """Images of folders, file arguments and a --from list as a `Source`: unit u is images
    `[u * per_unit, (u + 1) * per_unit)` of the `InputList`."""

    inputs: InputList
    per_unit: int
    kind: str = "files"
    noun: str = "images"
    columns: dict = field(default_factory=dict)
    may_hold_videos: bool = False  # a name with a video suffix is listed

    @property
    def warnings(self) -> list[str]:
        return self.inputs.warnings

    def __len__(self) -> int:
        return -(-len(self.inputs) // self.per_unit)

    def _range(self, u: int) -> range:
        return range(u * self.per_unit, min((u + 1) * self.per_unit, len(self.inputs)))

    def label(self, u: int) -> str:
        span = self._range(u)
        return f"images {span.start + 1}-{span.stop} ({self.inputs.name(span.start)}, ...)"

    def rows(self, u: int) -> int:
        return len(self._range(u))

    count_rows = rows

    def output_stem(self, u: int) -> str:
        return f"part-{u:0{max(5, len(str(len(self) - 1)))}d}"

    def num_inputs(self) -> int:
        return len(self.inputs)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.inputs.fingerprint()}\0{self.per_unit}".encode()).hexdigest()

    def samples(self, u: int, start: int = 0) -> Iterator[Sample]:
        span = self._range(u)
        for i in range(span.start + start, span.stop):
            path = self.inputs.path(i)
            yield Sample(self.inputs.name(i), path=path, video=self.may_hold_videos and is_video_name(path))


def open_source(names: list[str], options: SourceOptions) -> FileSource:
    """`iqa_cli.sources`' entry: the images of `names` and `options.from_file`, in units."""
    inputs = find_inputs(names, from_file=options.from_file, from_column=options.from_column, root=options.root)
    videos = any(is_video_name(name) for name in inputs.names)
    return FileSource(inputs, files_per_unit(len(inputs)), may_hold_videos=videos)


def find_inputs(
    paths: Sequence[str | Path] = (),
    *,
    from_file: str | Path | None = None,
    from_column: str | None = None,
    root: str | Path | None = None,
) -> InputList:
    """Expands folders, files and a `--from` list into the ordered, de-duplicated list of images.

    Raises:
        UserError: a path that does not exist, an unreadable or malformed list, a missing column, two
            different files that would get the same name, or no images at all.
    """
    root_abs = None
    if root is not None:
        if not Path(root).is_dir():
            raise UserError(f"--root {root}: not a directory")
        root_abs = os.path.abspath(root)

    builder = _Builder(root_abs)
    for given in paths:
        given = os.fspath(given)
        try:
            st = os.stat(given)
        except FileNotFoundError:
            raise UserError(f"input not found: {given}") from None
        except OSError as exc:
            raise UserError(f"cannot read input {given}: {exc.strerror or exc}") from None
        if stat.S_ISDIR(st.st_mode):
            before = len(builder.names)
            builder.add_folder(given)
            if len(builder.names) == before:
                builder.warnings.append(f"no images found in folder {given}")
        else:
            builder.add_file(given)

    if from_file is not None:
        for entry in read_path_list(from_file, column=from_column):
            builder.add_listed(entry)

    if not builder.names:
        where = ", ".join([os.fspath(p) for p in paths] + ([f"--from {from_file}"] if from_file else []))
        exts = " ".join(sorted(e.lstrip(".") for e in _WALKED))
        raise UserError(f"no images found in {where or 'the inputs'} (looked for files ending in: {exts})")
    return builder.build()


def read_path_list(path: str | Path, *, column: str | None = None) -> list[str]:
    """Reads the paths of a `--from` file: CSV/TSV or Parquet with a path column, else one path per line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--from {path}: file not found")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return _read_table_column(path, column)
    if column is not None:
        raise UserError(f"--from-column {column}: {path} is a plain list (one path per line), not a CSV or Parquet")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--from {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_table_column(path: Path, column: str | None) -> list[str]:
    import pandas as pd

    try:
        if TABLE_SUFFIXES[path.suffix.lower()] is None:  # Parquet
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            chosen = _pick_column(path, names, column)
            values = pq.read_table(path, columns=[chosen]).column(0).to_pylist()
        else:
            frame = pd.read_csv(path, sep=TABLE_SUFFIXES[path.suffix.lower()], dtype=str, keep_default_na=False)
            chosen = _pick_column(path, list(frame.columns), column)
            values = frame[chosen].tolist()
    except UserError:
        raise
    except Exception as exc:  # pandas/pyarrow parse errors: report as the file's fault
        raise UserError(f"--from {path}: cannot read ({' '.join(str(exc).split())})") from None
    entries = []
    for row, value in enumerate(values):
        if value is None or not str(value).strip():
            raise UserError(f"--from {path}: column {chosen!r} is empty in data row {row + 1}")
        entries.append(str(value).strip())
    return entries


def _pick_column(path: Path, columns: list[str], column: str | None) -> str:
    if column is not None:
        if column not in columns:
            raise UserError(f"--from-column {column}: no such column in {path} (columns: {', '.join(columns)})")
        return column
    lowered = {c.lower(): c for c in columns}
    for candidate in PATH_COLUMNS:
        if candidate in lowered:
            return lowered[candidate]
    wanted = "/".join(PATH_COLUMNS)
    raise UserError(f"--from {path}: no path column ({wanted}) among {', '.join(columns)}; name one with --from-column")


class _Builder:
    """Accumulates (base, name) pairs; `build` packs them and drops exact duplicates."""

    def __init__(self, root_abs: str | None):
        self.root_abs = root_abs
        self.names: list[str] = []
        self.base_ids: list[int] = []
        self.bases: list[str] = []
        self._base_index: dict[str, int] = {}
        self.keys = array("q")  # hash of each entry's resolved path (packed: 8 bytes an entry)
        self._real_dirs: dict[str, str] = {}
        self.warnings: list[str] = []

    def _base(self, base: str) -> int:
        if base not in self._base_index:
            self._base_index[base] = len(self.bases)
            self.bases.append(base)
        return self._base_index[base]

    def _under_root(self, path: str) -> str | None:
        """The path relative to --root when it lies under it, else None."""
        if self.root_abs is None:
            return None
        absolute = os.path.abspath(path)
        try:
            if os.path.commonpath([absolute, self.root_abs]) != self.root_abs:
                return None
        except ValueError:  # different drives
            return None
        return _posix(os.path.relpath(absolute, self.root_abs))

    def add_file(self, given: str) -> None:
        relative = self._under_root(given)
        if relative is not None:
            self._add(self.root_abs, relative)
        else:
            self._add("", _posix(given))
        self.keys[-1] = hash(os.path.realpath(given))  # a link given by name counts as its target

    def add_listed(self, entry: str) -> None:
        if self.root_abs is not None and not os.path.isabs(entry):
            self._add(self.root_abs, entry)
            return
        relative = self._under_root(entry)
        if relative is not None:
            self._add(self.root_abs, relative)
        else:
            self._add("", entry)

    def add_folder(self, folder: str) -> None:
        relative = self._under_root(folder)
        if relative is not None:
            base, prefix = self.root_abs, "" if relative == "." else relative + "/"
        else:
            base, prefix = folder, ""
        base_id = self._base(base)
        real_folder = os.path.realpath(folder)
        for name, linked in _walk(folder, self.warnings):
            self.names.append(prefix + name)
            self.base_ids.append(base_id)
            real = os.path.realpath(os.path.join(folder, name)) if linked else real_folder + "/" + name
            self.keys.append(hash(real))

    def _add(self, base: str, name: str) -> None:
        self.names.append(name)
        self.base_ids.append(self._base(base))
        self.keys.append(hash(self._resolve(f"{base}/{name}" if base else name)))

    def _resolve(self, path: str) -> str:
        """The path with its folder resolved (`os.path.realpath`, cached: a --from list names few folders).

        The file itself is resolved only when given on the command line: for millions of --from entries one
        `lstat` each would cost more than the whole listing, so a --from entry that is a link to another
        entry stays a second input.
        """
        if path[:1] != "/" or "/." in path or "//" in path:
            path = os.path.abspath(path)
        folder, _, name = path.rpartition("/")
        real = self._real_dirs.get(folder)
        if real is None:
            real = self._real_dirs[folder] = os.path.realpath(folder or "/")
        return real.rstrip("/") + "/" + name

    def build(self) -> InputList:
        self._drop_same_files()
        names, base_ids = self.names, self.base_ids
        if len(set(names)) != len(names):
            names, base_ids = self._drop_duplicates()
        return InputList(
            names=PackedStrings(names),
            base_ids=np.asarray(base_ids, dtype=np.int32),
            bases=self.bases,
            warnings=self.warnings,
        )

    def _drop_same_files(self) -> None:
        """Keeps the first entry of each resolved path (hashes compared first, then the paths themselves)."""
        keys = np.frombuffer(self.keys, dtype=np.int64)
        order = np.argsort(keys, kind="stable")  # within equal keys, the earlier entry first
        ordered = keys[order]
        same = ordered[1:] == ordered[:-1]
        if not same.any():
            return
        group_first = np.maximum.accumulate(np.where(np.r_[True, ~same], np.arange(len(keys)), 0))
        drop = [
            int(order[p])
            for p in np.flatnonzero(same) + 1
            if os.path.realpath(self._path(int(order[p]))) == os.path.realpath(self._path(int(order[group_first[p]])))
        ]
        if not drop:
            return
        keep = np.ones(len(keys), dtype=bool)
        keep[drop] = False
        self.names = [n for n, k in zip(self.names, keep, strict=True) if k]
        self.base_ids = [b for b, k in zip(self.base_ids, keep, strict=True) if k]
        self.keys = array("q", keys[keep].tobytes())
        self.warnings.append(
            f"{len(drop)} input(s) were the same file as an earlier input (given twice, a file inside a folder "
            "also given, or a symbolic link) and were scored once, under the earlier name"
        )

    def _path(self, i: int) -> str:
        return _join(self.bases[self.base_ids[i]], self.names[i])

    def _drop_duplicates(self) -> tuple[list[str], list[int]]:
        """The same file named twice is kept once; two different files under one name are refused."""
        first: dict[str, int] = {}
        keep_names, keep_bases = [], []
        dropped = 0
        for name, base_id in zip(self.names, self.base_ids, strict=True):
            if name not in first:
                first[name] = base_id
                keep_names.append(name)
                keep_bases.append(base_id)
                continue
            dropped += 1
            a = _join(self.bases[first[name]], name)
            b = _join(self.bases[base_id], name)
            if not _same_file(a, b):
                raise UserError(
                    f"two inputs would both be written as image {name!r} ({a} and {b}); "
                    "pass --root DIR to name images by their path relative to a common folder"
                )
        self.warnings.append(f"{dropped} duplicate input(s) listed more than once were scored once")
        return keep_names, keep_bases


def _walk(folder: str, warnings: list[str] | None) -> Iterator[tuple[str, bool]]:
    """(image path under `folder`, relative to it; whether a symbolic link lies on the way from `folder`), depth
    first in sorted order.

    Follows symbolic links to folders but enters each real folder once (symlink loops end); skips names
    starting with a dot; records folders it cannot read in `warnings`.
    """
    seen: set[tuple[int, int]] = set()
    top = os.stat(folder)
    seen.add((top.st_dev, top.st_ino))
    # Stack of iterators over sorted (name, is_dir, is_link) entries, with the relative prefix of each level
    # and whether it was reached through a link.
    stack = [("", False, iter(_sorted_entries(folder, "", warnings)))]
    while stack:
        prefix, under_link, entries = stack[-1]
        step = next(entries, None)
        if step is None:
            stack.pop()
            continue
        name, is_dir, is_link = step
        relative = prefix + name
        if is_dir:
            full = os.path.join(folder, relative)
            try:
                st = os.stat(full)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            stack.append((relative + "/", under_link or is_link, iter(_sorted_entries(folder, relative, warnings))))
        elif os.path.splitext(name)[1].lower() in _WALKED:
            yield relative, under_link or is_link


def _sorted_entries(folder: str, relative: str, warnings: list[str] | None) -> list[tuple[str, bool, bool]]:
    """Visible entries of one directory as (name, is_dir, is_link), sorted by the NFC form of the name."""
    path = os.path.join(folder, relative) if relative else folder
    entries = []
    try:
        with os.scandir(path) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir()  # follows symlinks; a broken link is not a folder
                    is_link = entry.is_symlink()  # from the directory entry's type: no system call
                except OSError:
                    is_dir = is_link = False
                entries.append((entry.name, is_dir, is_link))
    except OSError as exc:
        if warnings is not None:
            warnings.append(f"skipped folder {path}: {exc.strerror or exc}")
        return []
    entries.sort(key=lambda e: (_sort_key(e[0]), e[0]))
    return entries


def _sort_key(name: str) -> str:
    return name if name.isascii() else unicodedata.normalize("NFC", name)


def _posix(path: str) -> str:
    return path.replace(os.sep, "/") if os.sep != "/" else path


def _join(base: str, name: str) -> str:
    return os.path.join(base, name) if base else name


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
