"""What `iqa --version` reports besides the version: the libraries that decide the numbers, and the device."""

from __future__ import annotations

import platform
from importlib import metadata


def describe_runtime() -> str:
    """torch, transformers and Python versions, and the device `--device auto` would use.

    transformers' version comes from its package metadata: importing it takes seconds and is not needed.
    """
    import torch

    from iqa_cli.distributed import resolve_device

    try:
        transformers = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers = "not installed"
    device = resolve_device("auto")
    if device.type == "cuda":
        where = f"{device} ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    else:
        where = f"{device} (no CUDA device found)" if device.type == "cpu" else str(device)
    return (
        f"torch {torch.__version__}, transformers {transformers}, Python {platform.python_version()}\n"
        f"device (--device auto): {where}"
    )
