"""A pickle reader for request bodies that builds plain data only.

Flow-GRPO's reward client (`flow_grpo/rewards.py::deqa_score_remote`) POSTs `pickle.dumps({"images": [jpeg
bytes, ...]})`. Unpickling runs whatever callables a payload names, so this reader refuses every global
lookup (`find_class`) and persistent id: the only objects it can build are the ones pickle encodes with its own
opcodes. The result is then checked to hold nothing but dict, list, tuple, bytes, str, int, float, bool and
None (sets, bytearrays and the like, which also have opcodes, are refused there). Protocols 0-2 encode bytes
through a global (`_codecs.encode`), so they are refused too; Python's default protocol (4 or 5) is not.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

ALLOWED_TYPES = (dict, list, tuple, bytes, str, int, float, bool, type(None))
MAX_DEPTH = 32  # the protocol needs 2 (a dict of a list of bytes)


class UnsafePickleError(ValueError):
    """A pickle that names a callable or holds a type outside ALLOWED_TYPES; nothing of it was run."""


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(f"pickle refers to {module}.{name}; only plain data is accepted")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("pickle uses persistent ids; only plain data is accepted")


def loads_data(body: bytes) -> Any:
    """Unpickles `body` into plain data; raises UnsafePickleError (refused) or ValueError (not a pickle)."""
    try:
        value = _DataOnlyUnpickler(io.BytesIO(body)).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # truncated or garbage bodies raise many types
        raise ValueError(f"not a readable pickle ({type(err).__name__})") from None
    _check(value, 0)
    return value


def _check(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise UnsafePickleError(f"pickle nests deeper than {MAX_DEPTH} levels")
    if type(value) not in ALLOWED_TYPES:  # exact types: no subclasses
        raise UnsafePickleError(f"pickle holds a {type(value).__name__}; only plain data is accepted")
    if isinstance(value, dict):
        for key, item in value.items():
            _check(key, depth + 1)
            _check(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _check(item, depth + 1)
