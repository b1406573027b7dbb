"""Readers for the official metadata files of public IQA datasets (images, aesthetics, videos), into one common table.

Each module reads one dataset's files exactly as its authors distribute them and documents where each
format fact was checked. `DATASETS` maps the preset names of `iqa prepare` to their specs.
"""

from __future__ import annotations

from iqa_cli.datasets import (
    agiqa3k,
    ava,
    csiq,
    custom,
    flive,
    kadid,
    koniq,
    konvid1k,
    livew,
    lsvq,
    pipal,
    spaq,
    tid2013,
)
from iqa_cli.datasets._common import CORE_COLUMNS, OFFICIAL_SPLIT, DatasetSpec, MetaTable, ReadOptions
from iqa_cli.errors import UserError

DATASETS: dict[str, DatasetSpec] = {
    module.SPEC.name: module.SPEC
    for module in (koniq, spaq, kadid, pipal, livew, agiqa3k, tid2013, csiq, flive, ava, konvid1k, lsvq, custom)
}

__all__ = [
    "CORE_COLUMNS", "DATASETS", "OFFICIAL_SPLIT", "DatasetSpec", "MetaTable", "ReadOptions", "get_dataset",
    "source_help",
]  # fmt: skip


def get_dataset(name: str) -> DatasetSpec:
    """The preset called `name` (case-insensitive); a UserError listing the known ones otherwise."""
    key = name.strip().lower()
    spec = DATASETS.get(key)
    if spec is None:
        import difflib

        # "konIQ10k", "kadid-10k", "LIVE-wild": the preset the name starts with, else the most similar one
        starts = [preset for preset in DATASETS if key.replace("-", "").startswith(preset)]
        close = starts or difflib.get_close_matches(key, list(DATASETS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown dataset preset {name!r} ({hint}known: {', '.join(DATASETS)})")
    return spec


def source_help() -> str:
    """One line per preset: what `--csv` names and the default density."""
    lines = []
    for spec in DATASETS.values():
        flags = [f"density {spec.density}"]
        if spec.lower_is_better:
            flags.append("lower is better")
        if spec.pseudo_std is not None:
            flags.append(f"pseudo std {spec.pseudo_std:g} of the range")
        if spec.task != "quality":
            flags.append(spec.task)
        lines.append(f"{spec.name}: {spec.source_help} [{', '.join(flags)}]")
    return "\n".join(lines)
