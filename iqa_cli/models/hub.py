"""Where a model's files come from: a local directory as it is, or a Hugging Face repo id through the cache.

The one home of this decision for every family and command, so that a typo'd folder or an offline machine gets
the same one-line answer everywhere. Honours HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from iqa_cli.errors import UserError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # Hugging Face's owner/name


@dataclass
class ModelFiles:
    """A model's folder: a local directory, or a snapshot of the cache resolved from a repo id."""

    path: Path
    repo_id: str | None
    revision: str | None
    remote: bool = False  # resolved from a repo id: missing files may be fetched (same commit)


def resolve(model: str | Path, revision: str | None, patterns: list[str], *, what: str = "model") -> ModelFiles:
    """A local directory as is; a repo id through the Hugging Face cache (only the files `patterns` match)."""
    path = Path(model).expanduser()
    if path.is_dir():
        repo_id, rev = provenance_from_cache_path(path.resolve())
        return ModelFiles(path, repo_id, rev)
    text = str(model)
    if path.exists() or text.startswith((".", "/", "~")) or not REPO_ID.match(text):
        raise UserError(f"{what} {text!r}: not a directory and not a Hugging Face repo id (owner/name)")
    snapshot = download(text, revision, patterns)
    return ModelFiles(snapshot, text, snapshot.name, remote=True)


def provenance_from_cache_path(path: Path) -> tuple[str | None, str | None]:
    """(repo id, commit) when `path` is a snapshot folder of the Hugging Face cache."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--") :].replace("--", "/"), path.name
    return None, None


def download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """snapshot_download of the files `patterns` match, with one-line errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = repo_id.split("/")[-1]
    local_hint = f"download it where the Hub is reachable, or pass a local directory instead (--model /path/to/{name})"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise UserError(
            f"{repo_id}: not in the Hugging Face cache and the Hub cannot be reached (offline or no network);"
            f" {local_hint}"
        ) from exc
    except GatedRepoError as exc:
        raise UserError(
            f"{repo_id}: gated repository on the Hugging Face Hub; log in (hf auth login) or {local_hint}"
        ) from exc
    except RevisionNotFoundError as exc:
        raise UserError(f"{repo_id}: revision {revision!r} not found on the Hugging Face Hub") from exc
    except RepositoryNotFoundError as exc:
        raise UserError(f"{repo_id}: no such model repository on the Hugging Face Hub (or it is private)") from exc
    except HFValidationError as exc:
        raise UserError(f"{repo_id!r}: not a valid Hugging Face repo id") from exc
    except OSError as exc:  # HTTP errors, disk full, permissions
        raise UserError(f"{repo_id}: download failed ({exc}); {local_hint}") from exc


def fetch(files: ModelFiles, names: list[str]) -> None:
    """Downloads the named files of a Hub snapshot (same commit) if they are not there yet."""
    if not files.remote or all((files.path / n).exists() for n in names):
        return
    fetched = download(files.repo_id, files.revision, names)
    if fetched != files.path:  # the same commit lands in the same folder
        files.path = fetched


def hub_file(repo_id: str, filename: str, revision: str | None) -> Path | None:
    """One small file of a Hub repo (a config.json): the cached copy, else downloaded alone; None when neither
    works (offline, no such repo or file, an invalid id: the family's loader then says which)."""
    cached = cached_file(repo_id, filename, revision)
    if cached is not None:
        return cached
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception:
        return None


def cached_file(repo_id: str, filename: str, revision: str | None) -> Path | None:
    """A file of a Hub repo if the local Hugging Face cache holds it; None otherwise (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:  # an invalid repo id: the family's loader gives the readable error
        return None
    return Path(found) if isinstance(found, str) else None
