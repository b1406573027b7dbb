"""Durable writes shared by scoring runs and training runs: a file is either complete or absent, even after a
kill -9 or a power loss. Also the one reader of the small JSON files checkpoints and runs carry."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from iqa_cli.errors import UserError


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Makes a rename or removal in `path` durable; a no-op where the file system cannot fsync a folder."""
    with contextlib.suppress(OSError):
        fsync_file(path)


def fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root, name))
        fsync_dir(Path(root))


def publish(tmp: Path, path: Path) -> None:
    """Makes a finished temporary file or folder `path`, durably: its data fsynced, renamed over `path`, the
    rename fsynced. Every atomic write of iqa ends here."""
    if tmp.is_dir():
        fsync_tree(tmp)
    else:
        fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def temporary_name(path: Path) -> Path:
    """Where `path` is written before `publish`: a hidden `.NAME.PID.tmp` beside it (a reader of the folder skips
    it; a run that died leaves one that the next run of the same output removes)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields the temporary path to write `path` through; published when the block ends, removed if it raises:
    `path` is then complete, or as it was."""
    tmp = temporary_name(path)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes | str) -> None:
    """`data` to `path` through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def directory_fingerprint(model: str | Path) -> str | None:
    """A cheap identity of a local checkpoint directory's files (names, sizes, modification times).

    None for a Hub repo id (its commit hash identifies it). Lets `iqa score` tell a finished output from one
    written by an earlier checkpoint saved into the same directory, without loading any weights.
    """
    directory = Path(model)
    if not directory.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding one object (config.json, iqa.json, tokenizer files); anything else is a one-line
    UserError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data
