"""Ctrl-C and `kill` as an exception, so a long run unwinds through its `finally` blocks and can say how to resume.

The handlers are installed explicitly rather than relying on Python's own SIGINT handler: a shell that starts a
background job (`iqa train ... &`) sets SIGINT to SIG_IGN, Python then installs no handler at startup, and
`kill -INT` would be ignored. SIGTERM (what `kill`, schedulers and torchrun send) would otherwise end the process
without a word.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a KeyboardInterrupt, so `except Exception` blocks let it through."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal (130 for SIGINT)."""
        return 128 + self.signum


def install(on_signal: Callable[[int], None] | None = None) -> Callable[[], None]:
    """Makes SIGINT/SIGTERM raise `Interrupted` in the main thread (or calls `on_signal` with the signal number
    instead); returns a function restoring the previous handlers. A no-op off the main thread (Python allows
    handlers only there)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: Any) -> None:
        if on_signal is None:
            raise Interrupted(signum)
        on_signal(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


@contextlib.contextmanager
def signals_raise(*, defer: bool = False) -> Iterator[None]:
    """`install` for the duration of the block. With `defer`, a signal is only noted and raised as `Interrupted`
    when the block ends, so the write inside it is never cut short."""
    received: list[int] = []
    restore = install(received.append if defer else None)
    try:
        yield
    finally:
        restore()
    if received:
        raise Interrupted(received[0])
