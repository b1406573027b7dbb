"""One run at a time per output: an exclusive `fcntl.flock` on a lock file in the run's own folder.

`iqa score` locks `OUT.parts/.iqa-lock`, `iqa train` locks `OUT/.iqa-lock`. The file holds the holder's
host, pid and start time (JSON) for the message a second run prints; it is never used to decide whether
the lock is held: only `flock` decides. So a file left by a process that died (kill -9, power loss) is
taken over at once: the kernel released its lock with the process. On NFS, Linux implements `flock` with
the server's byte-range locks, so a run on another machine holds the lock too; its pid cannot be checked
from here, so the message says so, and the lock is released by the server when that client's lease ends
(NFSv4: about 90 s after a crash). A lock held by a pid of this host that no longer runs is a child it
forked and that did not close its copy: the message says that as well. Forked children (DataLoader
workers) close their copy at once (`os.register_at_fork`), so a run killed with -9 does not leave its lock
held by workers that are still winding down.

Under torchrun only rank 0 takes the lock; every rank follows rank 0's answer (run, refuse, keep waiting),
so the ranks of one launch share one lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from iqa_cli.errors import UserError

LOCK_NAME = ".iqa-lock"
POLL_SECONDS = 0.5
# errno values of file systems that cannot lock: the run goes on unlocked, with a warning.
NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_held: set[int] = set()  # descriptors of locks this process holds


def _close_held_in_child() -> None:
    """A forked child shares the parent's open lock file; closing its copy leaves the lock to the parent alone
    (unlocking would release it for both)."""
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


@dataclass(frozen=True)
class Holder:
    """What the lock file says about the run that holds it."""

    host: str = "?"
    pid: int = 0
    started: str = "?"  # ISO 8601, UTC
    command: str = "iqa"

    def describe(self) -> str:
        if not self.pid:
            return "its lock file does not say which"
        since = self.started.replace("T", " ").replace("+00:00", " UTC")
        text = f"pid {self.pid} on host {self.host}, since {since}"
        if self.host != socket.gethostname():
            return text + "; on another machine, so this one cannot check that it still runs"
        if self.pid and not _pid_alive(self.pid):
            return text + "; that pid has ended but a process it started still holds the lock"
        return text


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """An exclusive, non-blocking flock on `path`; `try_acquire` returns None when taken, else the holder."""

    def __init__(self, path: Path, command: str, *, remove_folder: bool = False):
        self.path = Path(path)
        self.command = command
        self.remove_folder = remove_folder  # on release, remove the folder too when empty
        self.fd: int | None = None
        self.owner = os.getpid()
        self.created_folder = False
        self.warning: str | None = None  # set when the file system cannot lock

    def try_acquire(self) -> Holder | None:
        if self.fd is not None:
            return None
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return self._read_holder()
            except OSError as exc:
                os.close(fd)
                if exc.errno not in NO_LOCKING:
                    raise UserError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
                self.warning = f"{self.path.parent} cannot be locked ({exc.strerror}); a second run goes unnoticed"
                return None
            # The holder before us may have removed the file after we opened it: then we locked a file
            # no one else will open, and must lock the one at `path` now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd, self.owner = fd, os.getpid()
                _held.add(fd)
                self._write_holder()
                return None
            os.close(fd)

    def _open(self) -> int:
        folder = self.path.parent
        for _ in range(100):  # another run may create or remove the folder between our steps
            try:
                if not folder.is_dir():
                    folder.mkdir(parents=True)
                    self.created_folder = True
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileExistsError:  # made in between by another run, or a file that is not a folder
                if not folder.is_dir() and folder.exists():
                    raise UserError(f"cannot create the lock file {self.path}: {folder} is not a folder") from None
            except FileNotFoundError:  # removed in between by a holder releasing
                pass
            except OSError as exc:
                raise UserError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from None
        raise UserError(f"cannot create the lock file {self.path}: its folder keeps appearing and disappearing")

    def _write_holder(self) -> None:
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": self.command,
        }
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)

    def _read_holder(self) -> Holder:
        for _ in range(10):  # the holder may be between taking the lock and writing its details
            try:
                info = json.loads(self.path.read_text(encoding="utf-8"))
                return Holder(str(info["host"]), int(info["pid"]), str(info["started"]), str(info["command"]))
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.05)
        return Holder()

    def release(self) -> None:
        """Removes the file while still holding the lock (so a waiter re-checks), then unlocks."""
        if self.fd is None or self.owner != os.getpid():  # a forked child: its copy is closed already
            return
        _held.discard(self.fd)
        with contextlib.suppress(OSError):
            self.path.unlink()
        if self.remove_folder or self.created_folder:
            with contextlib.suppress(OSError):  # only when empty
                self.path.parent.rmdir()
        fcntl.flock(self.fd, fcntl.LOCK_UN)  # also for forked children that share the open file
        os.close(self.fd)
        self.fd = None


def acquire(
    path: Path,
    *,
    command: str,
    target: str,
    wait: bool = False,
    remove_folder: bool = False,
    say: Callable[[str], None] | None = None,
    poll: float = POLL_SECONDS,
) -> RunLock | None:
    """Takes the run lock at `path` (rank 0 only under torchrun; the others follow rank 0's answer).

    Returns the lock to `release()` on rank 0, None on the other ranks.

    Args:
        command: this run's command, for the other run's message (`iqa score`).
        target: what the lock protects, named in the refusal (`--out s.parquet`).
        wait: wait for the other run instead of refusing; says once that it waits.
        remove_folder: remove the lock's folder on release when it is empty (score's sidecar).
        say: prints a line to the user (the waiting notice, a file system that cannot lock).

    Raises:
        UserError: another run holds the lock and `wait` is off, or the lock file cannot be created.
    """
    from iqa_cli import distributed

    main = distributed.env().is_main
    lock = RunLock(path, command, remove_folder=remove_folder) if main else None
    announced = False
    while True:
        status: tuple[str, str] | None = None
        if lock is not None:
            try:
                holder = lock.try_acquire()
                status = ("ok", "") if holder is None else ("held", f"{holder.command} run ({holder.describe()})")
            except UserError as exc:
                status = ("error", str(exc))
            except BaseException as exc:  # a bug: the other ranks must not wait for an answer forever
                distributed.broadcast_object(("error", f"rank 0 failed to take the lock: {exc!r}"))
                raise
        kind, text = distributed.broadcast_object(status)  # every rank follows rank 0
        if kind == "ok":
            break
        if kind == "error":
            raise UserError(text)
        if not wait:
            raise UserError(f"{target} is in use by another {text}; wait for it to end, or pass --wait")
        if not announced and say is not None and main:
            say(f"waiting for another {text} to finish with {target}")
        announced = True
        time.sleep(poll)
    if lock is not None and lock.warning and say is not None:
        say(f"warning: {lock.warning}")
    return lock


@contextlib.contextmanager
def hold(path: Path, **options) -> Iterator[None]:
    """`acquire(path, **options)` for the block, released at its end whatever happens."""
    lock = acquire(path, **options)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
