"""Process-wide settings the `iqa` console script applies before any command (and before torch is imported)."""

from __future__ import annotations

import atexit
import gc


def configure_process() -> None:
    """The interpreter's final garbage collection is skipped.

    `gc.freeze()` at exit: the collection Python runs at shutdown walks the ~200k objects that torch and the
    model leave (about 1 s after `iqa score`); they are freed by reference counting anyway, and every output
    is written, flushed and closed before then. atexit runs it only when the process ends, so calling
    `main()` in a test process changes nothing until that process exits.
    """
    atexit.unregister(gc.freeze)  # once, however often main() runs in one process
    atexit.register(gc.freeze)
