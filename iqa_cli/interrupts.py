"""Ctrl-C, `kill` and a hangup as an exception, so a long run unwinds through its `finally` blocks and can say how to
resume; and the rule for child processes: leave those signals to the main process.

The handlers are installed explicitly rather than relying on Python's own SIGINT handler: a shell that starts a
background job (`iqa train ... &`) sets SIGINT to SIG_IGN, Python then installs no handler at startup, and
`kill -INT` would be ignored. SIGTERM (what `kill`, schedulers, systemd, Kubernetes and torchrun send) and SIGHUP
(a closed terminal or ssh session) would otherwise end the process without a word. A SIGHUP ignored at start
(`nohup iqa ...`) stays ignored: that user asked to outlive the terminal.

A stop is often sent to the whole process group (Ctrl-C, `kill %1`, `timeout`, SLURM, systemd): a child (a
DataLoader worker, a serving worker) that died of it first would take work in flight with it, or make the main
process fail on its death instead of saving what is done. So children ignore these signals
(`leave_to_main_process`) and the main process stops them after it has saved.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived; a KeyboardInterrupt, so `except Exception` blocks let it through."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal (130 for SIGINT)."""
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __str__(self) -> str:
        return f"interrupted by {self.name}"


def _handled() -> list[signal.Signals]:
    """The stop signals this process handles: all three, but SIGHUP not when it is ignored (`nohup`)."""
    return [s for s in SIGNALS if not (s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN)]


def install(on_signal: Callable[[int], None] | None = None) -> Callable[[], None]:
    """Makes SIGINT/SIGTERM/SIGHUP raise `Interrupted` in the main thread (or calls `on_signal` with the signal
    number instead); returns a function restoring the previous handlers. A no-op off the main thread (Python allows
    handlers only there)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: Any) -> None:
        if on_signal is None:
            raise Interrupted(signum)
        on_signal(signum)

    previous = {s: signal.signal(s, handler) for s in _handled()}

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


def leave_to_main_process(*_: Any) -> None:
    """Makes this (child) process ignore SIGINT, SIGTERM and SIGHUP, so a stop sent to the whole process group
    reaches only the main process, which saves the work done and then ends its children. Usable as a DataLoader
    `worker_init_fn`.

    A main process that stops while it receives a batch closes the connection over which the worker hands it the
    batch's file descriptors; the worker's sharing thread (multiprocessing's resource_sharer, which reports
    through `sys.excepthook`) would print that ConnectionResetError, or the EOFError of a handshake cut short, as a
    traceback. Such a worker has nothing to tell the user, so those lost connections are dropped quietly.
    """
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    sys.excepthook = _quiet_about_lost_connections


def _quiet_about_lost_connections(kind: type[BaseException], value: BaseException, trace: Any) -> None:
    if not (issubclass(kind, ConnectionError) or (issubclass(kind, EOFError) and _in_a_connection(trace))):
        sys.__excepthook__(kind, value, trace)


def _in_a_connection(trace: Any) -> bool:
    """Whether the exception passed through multiprocessing's connections (an EOFError elsewhere is reported)."""
    while trace is not None:
        if trace.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "connection.py")):
            return True
        trace = trace.tb_next
    return False
