"""Values that shell completion offers (`autocompletion=` in cli.py).

Each list is read from the module that validates the option, imported only when the shell asks for it,
so `iqa --help` stays light and a new value completes without touching this file.
"""

from __future__ import annotations


def _matching(values, incomplete: str) -> list[str]:
    return [value for value in values if value.startswith(incomplete)]


def dataset_presets(incomplete: str) -> list[tuple[str, str]]:
    """`iqa prepare DATASET`: the presets, with their titles as descriptions (zsh and fish show them)."""
    from iqa_cli.datasets import DATASETS

    return [(name, spec.title) for name, spec in DATASETS.items() if name.startswith(incomplete)]


def densities(incomplete: str) -> list[str]:
    from iqa_cli.labels import DENSITIES

    return _matching(DENSITIES, incomplete)


def label_rules(incomplete: str) -> list[str]:
    from iqa_cli.labels import LABEL_RULES

    return _matching(LABEL_RULES, incomplete)


def methods(incomplete: str) -> list[str]:
    from iqa_cli.train import METHODS

    return _matching(METHODS, incomplete)


def layouts(incomplete: str) -> list[str]:
    from iqa_cli.train import LAYOUTS

    return _matching(LAYOUTS, incomplete)


def strategies(incomplete: str) -> list[str]:
    from iqa_cli.train import STRATEGIES

    return _matching(STRATEGIES, incomplete)


def devices(incomplete: str) -> list[str]:
    """auto, cpu, and the CUDA devices this machine has (a CUDA name elsewhere is an error)."""
    import torch

    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    return _matching(names, incomplete)


def dtypes(incomplete: str) -> list[str]:
    from iqa_cli.score import DTYPES

    return _matching(DTYPES, incomplete)


def formats(incomplete: str) -> list[str]:
    from iqa_cli.score_store import FORMATS

    return _matching(FORMATS, incomplete)


def splits(incomplete: str) -> list[str]:
    from iqa_cli.evaluate import SPLITS

    return _matching(SPLITS, incomplete)


def prediction_columns(incomplete: str) -> list[str]:
    from iqa_cli.evaluate import PREDICTION_COLUMNS

    return _matching(PREDICTION_COLUMNS, incomplete)
