"""Where a model's files come from: a local directory as it is, or a Hugging Face repo id through the cache.

The one home of this decision for every family and command, so that a typo'd folder or an offline machine gets
the same one-line answer everywhere, at once. It is taken locally first (`locate`):
- a name that looks like a path (`./`, `/`, `~`, a folder that exists here as its first part, a file) is never
  a repo id: a missing folder is `model folder not found: NAME (did you mean ...?)`;
- a repo id the cache holds is used from it (the libraries check the Hub for updates as usual; with the Hub out
  of reach, the cached snapshot is used as a local folder, so no library retries a dead network);
- a repo id the cache lacks is asked of the Hub once, quietly, with a short timeout (`PROBE_TIMEOUT_S`): no such
  repo, a gated one, a missing revision or an unreachable Hub is one line, instead of huggingface_hub's five
  retries (about 25 s and five `Retrying in 8s` lines) before the same answer.
Honours HF_HOME / HF_HUB_CACHE / HF_ENDPOINT / HF_HUB_OFFLINE.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from iqa_cli.errors import UserError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # Hugging Face's owner/name
PROBE_TIMEOUT_S = 5.0  # the one question to the Hub about a repo the cache lacks


@dataclass
class ModelFiles:
    """A model's folder: a local directory, or a snapshot of the cache resolved from a repo id."""

    path: Path
    repo_id: str | None
    revision: str | None
    remote: bool = False  # resolved from a repo id: missing files may be fetched (same commit)


def locate(model: str | Path, revision: str | None = None, *, what: str = "model") -> Path | str:
    """What `model` names, decided before any download: a local folder (its Path; also a cached snapshot when the
    Hub cannot be reached), or a repo id the cache holds or the Hub knows (the id).

    Raises:
        UserError: a missing folder (with the nearest existing names), a file, a name that is neither a path nor a
            repo id, a repo the Hub does not have, or one that is neither cached nor reachable.
    """
    folder = check_name(model, what=what)
    if folder is not None:
        return folder
    text = str(model)
    cached = cached_snapshot(text, revision)
    if cached is not None:
        return text if _hub_answer(text, revision) in ("ok", "unknown") else cached
    answer = _hub_answer(text, revision)
    if answer == "ok":
        return text
    if answer == "offline":
        raise UserError(
            f"{what} {text}: not in the Hugging Face cache, and HF_HUB_OFFLINE is set; use a local copy of its "
            "folder, or unset HF_HUB_OFFLINE where the Hub is reachable to download it"
        )
    if answer == "missing":
        raise UserError(f"{what} {text}: no such model repository on the Hugging Face Hub{_nearest_repo(text)}")
    if answer == "gated":
        raise UserError(f"{what} {text}: gated repository on the Hugging Face Hub; log in (hf auth login) first")
    if answer == "no revision":
        raise UserError(f"{what} {text}: revision {revision!r} not found on the Hugging Face Hub")
    raise UserError(
        f"{what} {text}: not in the Hugging Face cache, and the Hub cannot be reached ({answer}); use a local copy "
        "of its folder, or set HF_HUB_OFFLINE=1 (with HF_HUB_CACHE pointing at a cache that holds it)"
    )


def check_name(model: str | Path, *, what: str = "model") -> Path | None:
    """The local half of `locate`, no network: the folder's Path, or None for a well-formed repo id.

    Raises:
        UserError: a missing folder (with the nearest existing name), a file, neither a path nor a repo id.
    """
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        hint = f" (did you mean {path.parent}?)" if (path.parent / "config.json").is_file() else ""
        raise UserError(f"{what} {text}: is a file; give the model's folder or a Hugging Face repo id{hint}")
    if _looks_like_path(text):
        raise UserError(f"{what} folder not found: {text}{_nearest_folder(path)}")
    if not REPO_ID.match(text):
        raise UserError(f"{what} {text!r}: no such folder here, and not a Hugging Face repo id (owner/name)")
    return None


def _looks_like_path(text: str) -> bool:
    """`./x`, `/x`, `~/x`, `x\\y`, `a/b/c`, or `a/b` where `a` is a folder here: never a repo id."""
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") != 1:
        return True
    return Path(text).parent.is_dir()


def _nearest_folder(path: Path) -> str:
    """` (did you mean X?)` with the most similar folder next to where `path` was expected, or ``."""
    parent = path.parent
    if not parent.is_dir():
        return ""
    try:
        names = [p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    if not close:
        return ""
    suggestion = str(parent / close[0]) if str(parent) != "." else close[0]
    return f" (did you mean {suggestion}?)"


def _nearest_repo(repo_id: str) -> str:
    """` (did you mean X?)` with the most similar known repo id (the default model, each family's base and released
    checkpoints) or cached one, or ` (or it is private)`."""
    import importlib
    import pkgutil

    from iqa_cli.constants import DEFAULT_MODEL

    known = [DEFAULT_MODEL]
    for found in pkgutil.iter_modules([str(Path(__file__).parent)]):  # each family's package: constants only
        if found.ispkg:
            package = importlib.import_module(f"{__package__}.{found.name}")
            known += [getattr(package, "DEFAULT_TRAIN_MODEL", DEFAULT_MODEL), *getattr(package, "RELEASED", ())]
    candidates = {*known, *cached_repos()}
    lowered = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(repo_id.lower(), list(lowered), n=1, cutoff=0.8)
    return f" (did you mean {lowered[close[0]]}?)" if close else " (or it is private)"


@functools.cache
def _hub_answer(repo_id: str, revision: str | None) -> str:
    """One quiet question to the Hub about a repo (once per process): ok | missing | gated | no revision |
    offline | unknown (the Hub answered with an error of its own) | why it could not be reached."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if constants.HF_HUB_OFFLINE:
        return "offline"
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError:
        return "gated"
    except RepositoryNotFoundError:
        return "missing"
    except RevisionNotFoundError:
        return "no revision"
    except HfHubHTTPError as exc:  # the Hub answered, with an error of its own (a 5xx): let the download say
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return "unknown" if status is not None and status < 500 else f"the Hub answered {status}"
    except Exception as exc:  # connection refused, DNS failure, timeout, proxy errors
        return " ".join(str(exc).split())[:120] or type(exc).__name__
    return "ok"


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cache's snapshot folder of `repo_id` at `revision` (a branch, tag or commit), if the cache has one."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    name = revision or "main"
    ref = folder / "refs" / name
    try:
        commit = ref.read_text().strip() if ref.is_file() else name
    except OSError:
        return None
    snapshot = folder / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def cached_repos() -> list[str]:
    """Repo ids of the models the Hugging Face cache holds."""
    from huggingface_hub import constants

    try:
        folders = list(Path(constants.HF_HUB_CACHE).glob("models--*"))
    except OSError:
        return []
    return [f.name[len("models--") :].replace("--", "/", 1) for f in folders]


def resolve(model: str | Path, revision: str | None, patterns: list[str], *, what: str = "model") -> ModelFiles:
    """A local directory as is; a repo id through the Hugging Face cache (only the files `patterns` match)."""
    where = locate(model, revision, what=what)
    if isinstance(where, Path):
        repo_id, rev = provenance_from_cache_path(where.resolve())
        return ModelFiles(where, repo_id, rev)
    snapshot = download(where, revision, patterns)
    return ModelFiles(snapshot, where, snapshot.name, remote=True)


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

    local_hint = "use a local copy of its folder instead"
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
        raise UserError(f"{repo_id}: download failed ({' '.join(str(exc).split())}); {local_hint}") from exc


def fetch(files: ModelFiles, names: list[str]) -> None:
    """Downloads the named files of a Hub snapshot (same commit) if they are not there yet."""
    if not files.remote or all((files.path / n).exists() for n in names):
        return
    fetched = download(files.repo_id, files.revision, names)
    if fetched != files.path:  # the same commit lands in the same folder
        files.path = fetched


def hub_file(repo_id: str, filename: str, revision: str | None) -> Path | None:
    """One small file of a Hub repo (a config.json): the cached copy, else downloaded alone; None when neither
    works (no such file: the family's loader then says what is missing)."""
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
