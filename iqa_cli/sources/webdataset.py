"""WebDataset shards (`.tar`), as img2dataset writes them, streamed with the standard library's `tarfile`.

A shard is a tar of consecutive members that share a key: `00000123.jpg`, `00000123.txt`, `00000123.json`.
The key (`__key__`) is the member's path up to the first dot of its file name, as in the `webdataset`
library; a sample's image is its first member with an image suffix (those a folder walk takes: jpg, png, webp,
gif, tif, ...), else its first member with a video suffix (mp4, webm, mkv, mov, avi, m4v: the sample is a video,
as video2dataset writes them). img2dataset writes a metadata table
per shard next to it (`00000.parquet` beside `00000.tar`, one row per sample, column `key`).

Why `tarfile` and not the `webdataset` library: one tar read front to back in stream mode (`r|`, no seeks,
nothing extracted to disk) is all scoring needs, and reading it ourselves decides per member what a broken
sample is (an error row) and what a broken shard is (an error for the unit, the rows read so far kept),
where the library's handlers skip or raise whole samples; and it adds no dependency.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from iqa_cli.errors import UserError
from iqa_cli.images import IMAGE_EXTENSIONS
from iqa_cli.sources import DataFiles, Sample, SourceError, SourceOptions, unique_files
from iqa_cli.video import VIDEO_EXTENSIONS

IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # a sample's image member, first found in this order
VIDEO_SUFFIXES = tuple(e.lstrip(".") for e in VIDEO_EXTENSIONS)  # else its video member
# Members whose values --keep can copy (besides the shard's metadata parquet): JSON objects and plain text.
TEXT_SUFFIXES = ("txt",)


@dataclass(kw_only=True)
class ShardSource(DataFiles):
    """WebDataset shards as a `Source`: unit u is shard `paths[u]`; rows carry `shard` and the --keep columns."""

    kind: ClassVar[str] = "webdataset"
    noun: ClassVar[str] = "shards"
    may_hold_videos: ClassVar[bool] = True  # any member may be one: known only when read

    def __len__(self) -> int:
        return len(self.paths)

    def label(self, u: int) -> str:
        return self.paths[u]

    def rows(self, u: int) -> int:
        return -1  # known only by reading the headers: `count_rows`

    def count_rows(self, u: int) -> int:
        return count_samples(self.paths[u])

    def output_stem(self, u: int) -> str:
        return self.stems[u]

    def num_inputs(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"None\0{','.join(self.keep)}\0".encode())
        for path in self.paths:
            digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
        return digest.hexdigest()

    def samples(self, u: int, start: int = 0) -> Iterator[Sample]:
        path = self.paths[u]
        for i, (key, data, error, kept, video) in enumerate(samples(path, self.keep)):
            if i >= start:
                yield Sample(key, data=data, error=error, kept={"shard": path, **kept}, video=video)


def open_source(names: list[str], options: SourceOptions) -> ShardSource:
    """`iqa_cli.sources`' entry: the shards `names` (already expanded), each checked to start with a tar header."""
    if options.image_col is not None:
        raise UserError(f"--image-col {options.image_col}: WebDataset shards name their image by suffix, not by column")
    warnings: list[str] = []
    files = unique_files(names, warnings)
    for path, _ in files:
        check_tar(path)
    keep = [c for c in options.keep if c]
    keep_types: dict[str, Any] = {}
    if keep:
        available, where = keep_columns(files[0][0])
        missing = [c for c in keep if c not in available]
        if missing:
            have = ", ".join(available) or "none"
            raise UserError(f"--keep {','.join(missing)}: not found in {where} (columns: {have})")
        keep_types = {c: available[c] for c in keep}
    return ShardSource(
        paths=[p for p, _ in files],
        stems=[s for _, s in files],
        keep=keep,
        columns={"shard": None, **keep_types},
        warnings=warnings,
    )


def count_samples(path: str) -> int:
    """Samples in a shard from its headers alone (the data is skipped, not read); for one that breaks off, those
    before the break (0 for one that cannot be read)."""
    count, key = 0, None
    try:
        with tarfile.open(path, mode="r:", tarinfo=_CheckedHeader) as tar:
            for _, member_key, _ in _file_members(tar, whole=True):
                count += member_key != key
                key = member_key
    except (tarfile.TarError, OSError, EOFError, ShardError):
        pass
    return count


class ShardError(SourceError):
    """A shard that cannot be read to its end: an error for its unit; the rows read before it are kept."""


def check_tar(path: str) -> None:
    """Refuses a file whose first 512 bytes are not a tar header (one small read; no image is read).

    An empty tar (its end-of-archive block first) is a shard with no samples.
    """
    try:
        with open(path, "rb") as f:
            block = f.read(tarfile.BLOCKSIZE)
    except OSError as exc:
        raise UserError(f"cannot read shard {path}: {exc.strerror or exc}") from None
    if len(block) == tarfile.BLOCKSIZE and block == tarfile.NUL * tarfile.BLOCKSIZE:
        return
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as exc:
        raise UserError(f"{path}: not a tar file ({exc or 'bad header'})") from None


def split_key(name: str) -> tuple[str, str]:
    """`dir/00001.seg.jpg` -> (`dir/00001`, `seg.jpg`): the key up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower() if dot else ""


class _CheckedHeader(tarfile.TarInfo):
    """A header that records on its tar why it could not be read. `tarfile` ends the members at any unreadable
    header after the first (nothing, a cut one, a bad checksum) as at the end-of-archive block, without raising:
    a shard cut between members, or with one flipped byte in a later header, would read as complete."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # a block of zeros: the end-of-archive marker
            raise
        except tarfile.HeaderError as exc:
            tar.iqa_broken_header = f"{type(exc).__name__}: {exc or 'bad header'}"  # type: ignore[attr-defined]
            raise


def _file_members(tar: tarfile.TarFile, *, whole: bool = False) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """(member, key, suffix) of each regular file of a tar, in order (folders, links and the like skipped).
    `whole` (a tar opened with `tarinfo=_CheckedHeader`): once the members end, raises `ShardError` unless they
    ended at the end-of-archive marker with only zeros after it (the padding writers add to whole records)."""
    for member in tar:
        if member.isfile():
            yield (member, *split_key(member.name))
    if whole:
        _check_end(tar)


def _check_end(tar: tarfile.TarFile) -> None:
    broken = getattr(tar, "iqa_broken_header", None)
    if broken is not None:
        raise ShardError(f"the tar breaks off at byte {tar.offset} (no end-of-archive marker: {broken})")
    while block := tar.fileobj.read(1 << 20):  # after the first zero block: the rest must be zeros too
        if block.count(0) != len(block):
            raise ShardError(
                f"a block of zeros at byte {tar.offset} ends the tar but data follows it (a zeroed header?)"
            )


def metadata_path(shard: str) -> Path:
    """img2dataset's per-shard metadata table: `00000.parquet` next to `00000.tar`."""
    return Path(shard).with_suffix(".parquet")


def samples(path: str, keep: list[str]) -> Iterator[tuple[str, bytes | None, str | None, dict[str, Any], bool]]:
    """Yields (key, image or video bytes or None, error or None, {kept column: value}, is a video) per sample, in
    tar order.

    Kept values come from the shard's metadata parquet (joined on `key`) when it has the column, else from
    the sample's `.json` member, else from a member with that suffix (`txt`). A sample without an image member
    is an error row naming what it has.

    Raises:
        ShardError: the tar breaks off or is corrupt; the sample being read when it broke is yielded first
            as an error row.
    """
    table = _metadata_rows(path, keep)
    key, members = None, {}
    try:
        with tarfile.open(path, mode="r|*", tarinfo=_CheckedHeader) as tar:
            for member, member_key, suffix in _file_members(tar, whole=True):
                if member_key != key and key is not None:
                    yield _sample(key, members, table, keep)
                    members = {}
                key = member_key
                try:
                    data = tar.extractfile(member).read()
                except (tarfile.TarError, OSError, EOFError) as exc:
                    members = {"__broken__": str(exc) or type(exc).__name__}
                    raise
                if suffix not in members:
                    members[suffix] = data
    except (tarfile.TarError, OSError, EOFError, zlib.error, ShardError) as exc:
        if key is not None:
            broken = members.pop("__broken__", None)
            if broken is not None:
                yield key, None, f"shard broke off in this sample: {broken}", {c: None for c in keep}, False
            else:
                yield _sample(key, members, table, keep)
        if isinstance(exc, ShardError):
            raise
        raise ShardError(f"{type(exc).__name__}: {' '.join(str(exc).split()) or 'unreadable'}") from None
    if key is not None:
        yield _sample(key, members, table, keep)


def _sample(key: str, members: dict[str, bytes], table: dict[str, dict], keep: list[str]):
    kept = _kept(key, members, table, keep)
    for suffix in IMAGE_SUFFIXES:
        if suffix in members:
            return key, members[suffix], None, kept, False
    for suffix in VIDEO_SUFFIXES:
        if suffix in members:
            return key, members[suffix], None, kept, True
    has = ", ".join(sorted(members)) or "nothing"
    return key, None, f"no image or video member (a suffix such as jpg, png or mp4); the sample has: {has}", kept, False


def _kept(key: str, members: dict[str, bytes], table: dict[str, dict], keep: list[str]) -> dict[str, Any]:
    if not keep:
        return {}
    row = table.get(key, {})
    parsed = None
    values = {}
    for column in keep:
        if column in row:
            values[column] = row[column]
            continue
        if parsed is None:
            parsed = _json_member(members.get("json"))
        if column in parsed:
            values[column] = parsed[column]
        elif column in members:
            values[column] = members[column].decode("utf-8", "replace")
        else:
            values[column] = None
    return values


def _json_member(data: bytes | None) -> dict:
    if not data:
        return {}
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _metadata_rows(path: str, keep: list[str]) -> dict[str, dict]:
    """{key: {column: value}} of the --keep columns the shard's metadata parquet holds ({} without one)."""
    table_path = metadata_path(path)
    if not keep or not table_path.is_file():
        return {}
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(table_path).names
        wanted = [c for c in keep if c in names]
        if "key" not in names or not wanted:
            return {}
        table = pq.ParquetFile(table_path).read(columns=["key", *wanted])
    except Exception as exc:  # a broken metadata table loses the kept columns, not the scores
        why = " ".join(str(exc).split()) or type(exc).__name__
        print(  # from a loading worker: no channel to the run's summary
            f"warning: cannot read the metadata table {table_path} ({why}); its shard's --keep columns come from "
            "the samples' .json members (else null)",
            file=sys.stderr,
            flush=True,
        )
        return {}
    keys = table.column("key").to_pylist()
    columns = {c: table.column(c).to_pylist() for c in wanted}
    return {str(k): {c: columns[c][i] for c in wanted} for i, k in enumerate(keys)}


def keep_columns(path: str) -> tuple[dict[str, Any], str]:
    """The columns --keep can name for a shard, with their arrow types where known (None: a string), and where
    they were looked for.

    The first sample's `.json` keys and text members (read from the tar's first members, stopping at the second
    sample), and the columns of the shard's metadata parquet, whose schema gives their types.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    found: dict[str, Any] = {}
    key = None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member, member_key, suffix in _file_members(tar):
                if key is not None and member_key != key:
                    break
                key = member_key
                if suffix == "json":
                    found.update({c: None for c in _json_member(tar.extractfile(member).read())})
                elif suffix in TEXT_SUFFIXES:
                    found[suffix] = pa.string()
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        pass
    where = f"the first sample of {path}"
    table_path = metadata_path(path)
    if table_path.is_file():
        try:
            schema = pq.read_schema(table_path)
        except Exception as exc:
            raise UserError(f"{table_path}: cannot read the shard's metadata table ({exc})") from None
        found.update({f.name: f.type for f in schema})
        where += f" and {os.fspath(table_path)}"
    return found, where
