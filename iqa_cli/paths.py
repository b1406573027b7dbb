"""Where `iqa` reads and writes by default, and the checks that an output path is usable before any work.

Every command checks its output places first (a folder under a file, one it cannot create, one that takes no
write: read-only, not permitted, full), so a mistake costs one line and nothing is half-written; a disk that fills
up later is one line too (`write_error`), and every write is atomic, so no file is left half-written.
"""

import errno
import os
import tempfile
from pathlib import Path

from iqa_cli.errors import UserError

DATA_DIR_ENV = "IQA_DATA_DIR"
DEFAULT_DATA_DIR = "iqa-data"
# what only a write is answered with (the disk, the quota, a read-only mount), and what a read or a write may be
# answered with (a permission, a path); each is the user's to fix
FULL_OR_READ_ONLY = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
WRITE_ERRNOS = FULL_OR_READ_ONLY | {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """`--data-dir`, else `$IQA_DATA_DIR`, else `./iqa-data` (docs/METHOD.md, "Files iqa writes")."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path(DEFAULT_DATA_DIR)


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower() if exc.errno != errno.ENOSPC else "no space left on the device"


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` (itself included) when it is a file, not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _check_writable_folder(folder: Path, flag: str, path: Path) -> None:
    """Creates `folder` if needed and writes a one-byte probe file into it.

    A real write, not os.access: root passes access checks on read-only places such as /proc, and only a write
    of data (not an empty file) meets a full disk.
    """
    blocker = _file_above(folder)
    if blocker is not None:
        raise UserError(f"{flag} {path}: {blocker} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot create folder {folder} ({_reason(exc)})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.probe-") as probe:
            probe.write(b"\0")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write in folder {folder} ({_reason(exc)})") from None


def check_output_file(path: Path, flag: str = "--out", example: str = "scores.parquet") -> None:
    """An output file can be written: not a folder, its folder exists (created here) and takes a write."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file name such as {path / example}")
    _check_writable_folder(path.parent if str(path.parent) else Path("."), flag, path)


def check_output_dir(path: Path, flag: str = "--out") -> None:
    """An output folder can be written: not an existing file, and it (or, if new, its parent) takes a write.

    A new folder itself is not created here, so a run refused later leaves nothing behind.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder")
    if path.is_dir():
        _check_writable_folder(path, flag, path)
    else:
        _check_writable_folder(path.parent if str(path.parent) else Path("."), flag, path)


def write_error(exc: Exception, place: str | None = None) -> UserError | None:
    """A failed write of an output (the disk filled up, a folder turned read-only) or a refused file (no permission)
    as one line naming the file, else the output `place`; None for other errors, which are not the user's to fix."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:  # the errno in the text: pyarrow's OSError "[errno 28]", safetensors' SafetensorError "(os error
        # 28)"; another library's error counts only as a full or read-only disk (a refused read is no output's fault)
        for candidate in WRITE_ERRNOS if isinstance(exc, OSError) else FULL_OR_READ_ONLY:
            if f"[errno {candidate}]" in str(exc) or f"(os error {candidate})" in str(exc):
                code = candidate
    if code not in WRITE_ERRNOS:
        return None
    reason = "no space left on the device" if code == errno.ENOSPC else os.strerror(code).lower()
    if code in FULL_OR_READ_ONLY:
        filename = getattr(exc, "filename", None)
        where = f" {filename}" if filename else f" {place}" if place else ""
        return UserError(f"cannot write{where}: {reason}")
    return UserError(f"{getattr(exc, 'filename', None) or place or 'a file'}: {reason}")  # a read as much as a write
