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


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'iqa_cli' has no attribute {name!r}")
