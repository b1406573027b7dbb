"""Disk size of `pip install -e .` (no extras) in this environment, and of the same install with torch's CPU build.

Measured from the installed packages' own file lists (their RECORD files): the dependency closure of `iqa-cli`
without extras, as pip resolved it here. torch's CPU build cannot be installed here when PyTorch's CPU wheel
index is out of reach, so its size is this install less what only the CUDA build holds: the `nvidia-*` and
`triton` packages and torch's own CUDA libraries (`torch/lib/*cuda*`, `*nvshmem*`, `*cudnn*`). A CPU wheel's
`libtorch_cpu.so` is not byte for byte the CUDA wheel's, so that figure is an estimate within tens of MB.

    python benchmarks/install_size.py
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

CUDA_ONLY_PACKAGES = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")
CUDA_ONLY_TORCH_FILES = re.compile(r"^torch/lib/.*(cuda|nvshmem|cudnn|nccl|cublas|cusparse).*")


def closure(root: str) -> dict[str, metadata.Distribution]:
    """The installed distributions `root` needs (without its extras; with those its requirements ask for, as
    torch's `cuda-toolkit[cublas,...]`), by normalized name."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    pending: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    while pending:
        raw, extras = pending.pop()
        name = re.sub(r"[-_.]+", "-", raw).lower()
        try:
            dist = found.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement whose marker does not apply here
        found[name] = dist
        for extra in ("", *extras):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for text in dist.requires or []:
                requirement = Requirement(text)
                if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                    if requirement.marker is not None and "extra" in str(requirement.marker) and not extra:
                        continue  # an optional dependency nobody asked for
                    pending.append((requirement.name, frozenset(requirement.extras)))
    return found


def size(dist: metadata.Distribution, skip: re.Pattern | None = None) -> int:
    total = 0
    for file in dist.files or []:
        if skip is not None and skip.match(str(file)):
            continue
        path = Path(dist.locate_file(file))
        if path.is_file():
            total += path.stat().st_size
    return total


def main() -> None:
    dists = closure("iqa-cli")
    dists.update({n: d for n, d in closure("torchvision").items() if n not in dists})
    cuda_only = {n for n in dists if CUDA_ONLY_PACKAGES.match(n)}
    sizes = {n: size(d) for n, d in dists.items()}
    torch_cuda_files = sizes.get("torch", 0) - size(dists["torch"], CUDA_ONLY_TORCH_FILES) if "torch" in dists else 0
    total = sum(sizes.values())
    cpu = total - sum(sizes[n] for n in cuda_only) - torch_cuda_files
    gb = 1e9
    print(f"python {sys.version.split()[0]}, torch {dists['torch'].version}, {len(dists)} packages")
    print(f"installed (this build of torch):        {total / gb:5.2f} GB")
    print(f"  nvidia-* and triton packages:          {sum(sizes[n] for n in cuda_only) / gb:5.2f} GB")
    print(f"  torch's CUDA libraries (torch/lib):    {torch_cuda_files / gb:5.2f} GB")
    print(f"with torch's CPU build (estimate):       {cpu / gb:5.2f} GB")
    for name, value in sorted(sizes.items(), key=lambda item: -item[1])[:8]:
        print(f"  {name:<28} {value / gb:5.2f} GB")


if __name__ == "__main__":
    main()
