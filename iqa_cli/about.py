"""What `iqa --version` reports besides the version: the libraries that decide the numbers, and the device."""

from __future__ import annotations

import platform
import re
from importlib import metadata


def describe_runtime() -> str:
    """torch, transformers and Python versions, and the device `--device auto` would use.

    Nothing heavy is imported (torch alone takes 1-2 s, transformers seconds): the versions come from the
    package metadata and torch's CUDA build from its version.py, read as text. Whether a GPU is visible is
    only known by initializing CUDA, so a CUDA build says which device `auto` picks in either case.
    """
    torch_version, cuda = _torch_build()
    transformers = _version("transformers")
    if torch_version == "not installed":
        where = "none (torch is not installed)"
    elif cuda is None:
        where = "cpu (this torch build has no CUDA)"
    else:
        where = f"cuda:0 when a GPU is visible, else cpu (torch built with {cuda})"
    return (
        f"torch {torch_version}, transformers {transformers}, Python {platform.python_version()}\n"
        f"device (--device auto): {where}"
    )


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _torch_build() -> tuple[str, str | None]:
    """(torch's version, "CUDA x.y" / "ROCm x.y" it was built with or None), without importing torch."""
    try:
        dist = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return "not installed", None
    try:
        text = dist.locate_file("torch/version.py").read_text(encoding="utf-8")
    except OSError:
        text = ""
    # torch.__version__ as torch prints it: a wheel's metadata may omit the local build tag ("+cu130")
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    version = found.group(1) if found else dist.version
    for name, label in (("cuda", "CUDA"), ("hip", "ROCm")):  # torch.cuda drives ROCm GPUs too
        match = re.search(rf"^{name}(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
        if match:
            return version, f"{label} {match.group(1)}"
    return version, None
