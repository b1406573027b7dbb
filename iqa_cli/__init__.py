"""iqa: image quality assessment with multimodal LLMs, as a batch command-line tool and a Python library.

    from iqa_cli import Scorer
    scorer = Scorer.from_pretrained("zhiyuanyou/DeQA-Score-Mix3")
    scorer.score(["a.jpg", "b.png"])

The names below load on first use, so `import iqa_cli` (and `iqa --help`) does not import torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "Scorer": "iqa_cli.scoring.scorer",
    "ImageScore": "iqa_cli.scoring.scorer",
    "ScoreConfig": "iqa_cli.scoring.config",
    "score_images": "iqa_cli.scoring.driver",
    "create_metric": "iqa_cli.pyiqa",
}
__all__ = ["__version__", *_LAZY]


def lazy_attributes(module_name: str, table: dict[str, str]):
    """A module's `__getattr__` that imports each name of `table` from its module on first use (and keeps it)."""
    import importlib
    import sys

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name]), name)
        setattr(sys.modules[module_name], name, value)
        return value

    return __getattr__


__getattr__ = lazy_attributes(__name__, _LAZY)
