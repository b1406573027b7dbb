"""Process-wide settings the `iqa` console script applies before any command (and before torch is imported)."""

from __future__ import annotations

import atexit
import gc
import os


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
    atexit.unregister(gc.freeze)  # once, however often main() runs in one process
    atexit.register(gc.freeze)


def keep_final_collection() -> None:
    """Undoes the exit-time `gc.freeze()` for a process that joined a torch.distributed group.

    Objects that hold a process group in reference cycles (FSDP2 state, a module that failed mid-run) must be
    freed, and gloo's threads joined by their destructors, before the interpreter goes; a frozen heap leaks
    them into shutdown, where a rank can abort. Distributed runs are long, so the second it costs is noise.
    """
    atexit.unregister(gc.freeze)
