"""Values that shell completion offers (`autocompletion=` in cli.py).

Each list is read from the module that validates the option, imported only when the shell asks for it,
so `iqa --help` stays light and a new value completes without touching this file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def _values_of(module: str, name: str) -> Callable[[str], list[str]]:
    """A completer offering `module.name`'s values that start with what was typed."""

    def complete(incomplete: str) -> list[str]:
        return [value for value in getattr(importlib.import_module(module), name) if value.startswith(incomplete)]

    return complete


densities = _values_of("iqa_cli.labels", "DENSITIES")
label_rules = _values_of("iqa_cli.labels", "LABEL_RULES")
methods = _values_of("iqa_cli.training.objectives", "METHODS")
layouts = _values_of("iqa_cli.training.config", "LAYOUTS")
strategies = _values_of("iqa_cli.training.config", "STRATEGIES")
dtypes = _values_of("iqa_cli.model_options", "DTYPES")
quantize_modes = _values_of("iqa_cli.model_options", "QUANTIZE_MODES")
reasoning_presets = _values_of("iqa_cli.reasoning", "PRESET_NAMES")
formats = _values_of("iqa_cli.scoring.output", "FORMATS")
splits = _values_of("iqa_cli.evaluate", "SPLITS")
prediction_columns = _values_of("iqa_cli.evaluate", "PREDICTION_COLUMNS")


def dataset_presets(incomplete: str) -> list[tuple[str, str]]:
    """`iqa prepare DATASET`: the presets, with their titles as descriptions (zsh and fish show them)."""
    from iqa_cli.datasets import DATASETS

    return [(name, spec.title) for name, spec in DATASETS.items() if name.startswith(incomplete)]


def devices(incomplete: str) -> list[str]:
    """auto, cpu, and the CUDA devices this machine has (a CUDA name elsewhere is an error)."""
    import torch

    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    return [name for name in names if name.startswith(incomplete)]
