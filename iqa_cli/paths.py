"""Where `iqa` reads and writes by default, and the checks that an output path is usable before any work."""

import os
import tempfile
from pathlib import Path

from iqa_cli.errors import UserError

DATA_DIR_ENV = "IQA_DATA_DIR"
DEFAULT_DATA_DIR = "iqa-data"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """`--data-dir`, else `$IQA_DATA_DIR`, else `./iqa-data` (docs/METHOD.md, "Files iqa writes")."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path(DEFAULT_DATA_DIR)


def _check_writable_folder(folder: Path, flag: str, path: Path) -> None:
    """Creates `folder` if needed and writes a probe file into it.

    A real write, not os.access: root passes access checks on read-only places such as /proc.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot create folder {folder} ({exc.strerror or exc})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.probe-"):
            pass
    except OSError:
        raise UserError(f"{flag} {path}: folder {folder} is not writable") from None


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
        raise UserError(f"{flag} {path}: is a file, not a folder; give a new or empty folder")
    if path.is_dir():
        _check_writable_folder(path, flag, path)
    else:
        _check_writable_folder(path.parent if str(path.parent) else Path("."), flag, path)
