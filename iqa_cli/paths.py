"""Where `iqa` reads and writes by default."""

import os
from pathlib import Path

DATA_DIR_ENV = "IQA_DATA_DIR"
DEFAULT_DATA_DIR = "iqa-data"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """`--data-dir`, else `$IQA_DATA_DIR`, else `./iqa-data` (DESIGN.md, "Files iqa writes")."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path(DEFAULT_DATA_DIR)
