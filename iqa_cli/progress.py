"""The progress bar of `iqa score` and `iqa train`: one rich bar on stderr, or a bar that shows nothing.

`iqa score` advances it by images scored and shows images/s; `iqa train` sets the optimizer step and shows
its own text (loss, lr, images/s). With --quiet, without a console, and on every rank but 0 the bar is a
`NullBar`, so callers never test whether to draw.
"""

from __future__ import annotations

import time
from typing import Any


class ProgressBar:
    """label, bar, done/total, a text field, elapsed, eta; messages printed above it while it runs."""

    def __init__(self, console: Any, total: int | None, label: str, completed: int = 0):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(label, total=total, completed=completed, info="")
        self.started = time.monotonic()
        self.done = 0  # advanced by this bar (images/s counts these, not the `completed` it started from)

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.progress.stop()

    def advance(self, n: int) -> None:
        """`n` more images done; the text field shows images/s."""
        self.done += n
        elapsed = max(time.monotonic() - self.started, 1e-9)
        speed = self.progress.tasks[0].speed or self.done / elapsed
        self.progress.update(self.task, advance=n, info=f"{speed:.1f} img/s")

    def update(self, completed: int, info: str) -> None:
        """`completed` of the total done, with the caller's text."""
        self.progress.update(self.task, completed=completed, info=info)

    def set_total(self, total: int) -> None:
        """The total once it is known (shards are counted while the run goes on); safe from another thread."""
        self.progress.update(self.task, total=total)

    def print(self, line: str) -> None:
        self.progress.console.print(line, markup=False, soft_wrap=True)


class NullBar:
    """The bar of --quiet runs and of ranks other than 0: draws nothing; `print` goes to `say`, if any."""

    def __init__(self, say: Any = None):
        self.say = say

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def update(self, completed: int, info: str) -> None:
        pass

    def set_total(self, total: int) -> None:
        pass

    def print(self, line: str) -> None:
        if self.say is not None:
            self.say(line)


def progress_bar(
    console: Any, total: int | None, label: str, *, show: bool = True, completed: int = 0, say: Any = None
) -> ProgressBar | NullBar:
    """A `ProgressBar` on `console`, or a `NullBar` when there is none or `show` is false (--quiet, rank > 0)."""
    if console is None or not show:
        return NullBar(say)
    return ProgressBar(console, total, label, completed=completed)
