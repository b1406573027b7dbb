"""Process-wide settings the `iqa` console script applies before any command (and before torch is imported)."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def configure_process() -> None:
    """OpenMP threads sleep when idle, and the interpreter's final garbage collection is skipped.

    OMP_WAIT_POLICY=PASSIVE, unless the user set it: torch's OpenMP threads otherwise spin between parallel
    regions, on the cores the DataLoader workers decode on (on a busy 2-core box 2 threads used 733-1,221 ms
    CPU per batch instead of 228-240 ms on 1). OpenMP reads it once, so it is set before torch is imported.

    `gc.freeze()` at exit: the collection Python runs at shutdown walks the ~200k objects that torch and the
    model leave (about 1 s after `iqa score`); they are freed by reference counting anyway, and every output
    is written, flushed and closed before then. atexit runs it only when the process ends, so calling
    `main()` in a test process changes nothing until that process exits.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    quiet_torchao_notice()
    atexit.unregister(gc.freeze)  # once, however often main() runs in one process
    atexit.register(gc.freeze)


def quiet_torchao_notice() -> None:
    """Filters `_not_the_enum_registration_notice` (for the console script and the benchmark scripts)."""
    logging.getLogger("torch.utils._pytree").addFilter(_not_the_enum_registration_notice)  # once: a set


def _not_the_enum_registration_notice(record: logging.LogRecord) -> bool:
    """Drops torch 2.14's notice that torchao 0.18 registers its enums with pytree (two lines per process).

    transformers imports torchao whenever it is installed (the `quantize` and `test` extras install it), so
    every model load printed them on stderr, under the one-line errors too. Other pytree messages pass.
    """
    return "is an Enum subclass and is now natively supported" not in record.getMessage()


def keep_final_collection() -> None:
    """Undoes the exit-time `gc.freeze()` for a process that joined a torch.distributed group.

    Objects that hold a process group in reference cycles (FSDP2 state, a module that failed mid-run) must be
    freed, and gloo's threads joined by their destructors, before the interpreter goes; a frozen heap leaks
    them into shutdown, where a rank can abort. Distributed runs are long, so the second it costs is noise.
    (The console script's `run_then_exit` skips the teardown altogether; this is for `main()` called in a
    process that then exits normally, and for that function's normal-exit fallback.)
    """
    atexit.unregister(gc.freeze)


def run_then_exit(main: Callable[[], object]) -> NoReturn:
    """The console script: runs `main`, then ends the process without the interpreter's teardown.

    Python's finalization frees every module and object one by one, which after `iqa score` (torch, the model, ~200k
    objects) took 0.43 s of a 0.55 s exit on a loaded 2-core box even with the final collection skipped; the
    operating system takes the memory back at once. So, after `main` returns or exits: the atexit handlers run
    (multiprocessing joins or ends its children, logging flushes; every output file is already closed), stdout and
    stderr are flushed, and `os._exit` ends the process with the exit code Python would have used. A non-daemon
    thread still running (which the interpreter would wait for) or an exception other than SystemExit gets the
    normal exit. In-process callers use `main` itself.
    """
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)  # as the interpreter reports a non-integer exit code
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more can be said there
            stream.flush()
    os._exit(code)


MAX_WORKERS = 8  # default DataLoader workers of a rank: one per core it may use, at most this many


def cores() -> int:
    """The cores this process may run on (its CPU affinity, as a scheduler or `taskset` set it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(local_world_size: int = 1, *, keep_free: int = 0) -> int:
    """Decoding processes of one rank: its share of the cores less `keep_free` (the training loop keeps one for
    itself; scoring's model threads take what the workers leave), at most MAX_WORKERS, at least 1 - keep_free."""
    return max(1 - keep_free, min(MAX_WORKERS, cores() // max(1, local_world_size) - keep_free))
