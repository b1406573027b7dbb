"""The one exception type for user mistakes.

Library code raises `UserError` for anything the user can fix (a missing file, a misnamed column, a
bad flag value). The CLI prints its message as one line and exits with code 2; everything else is a
bug and keeps its traceback.

Messages name the command-line flag at fault (`--prompt`, `--min-pixels`), as most mistakes are typed there. The
Python API (`Scorer`) says the same in its own words, by the keyword argument (`prompt`, `min_pixels`), unless a
command runs in this process (`speak_flags`).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
_flags_spoken = False  # True in a process that runs an `iqa` command


class DecodeError(Exception):
    """An image or video that cannot be decoded: scoring makes it a row with `error` set (its `reason`) and goes on;
    training leaves it out."""

    def __init__(self, reason: str, path: str | None = None):
        super().__init__(reason, path)
        self.reason = reason
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class UserError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2.

    The message names the file, column or value at fault and, where it helps, what would be accepted.
    """

    exit_code = 2


def speak_flags(spoken: bool = True) -> bool:
    """Whether errors keep naming the flags (this process runs an `iqa` command); returns the previous setting."""
    global _flags_spoken
    previous, _flags_spoken = _flags_spoken, spoken
    return previous


def api_words(message: str) -> str:
    """A message's flags as keyword arguments: `--min-pixels 2000` -> `min_pixels 2000`."""
    return _FLAG.sub(lambda m: m.group(1).replace("-", "_"), message)


@contextlib.contextmanager
def in_api_words() -> Iterator[None]:
    """A UserError raised inside names keyword arguments instead of flags (a no-op under a command)."""
    try:
        yield
    except UserError as exc:
        if _flags_spoken:
            raise
        error = UserError(api_words(str(exc)))
        error.exit_code = exc.exit_code
        raise error from None


def api_errors(function: Callable) -> Callable:
    """`in_api_words` around every call of a public API function."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with in_api_words():
            return function(*args, **kwargs)

    return wrapper
