"""`iqa train`: fine-tune mPLUG-Owl2 with the DeQA-Score, Q-Align or Q-Scorer objective.

One module per concern, in the order a run uses them:

- `config`: the run configuration (nested dataclasses, built from the command-line options).
- `objectives`: deqa / qalign / qscorer, each with its default loss weights and its loss.
- `data`: prepared metas -> rows, the epoch order, pairs, prompts, batches.
- `model`: level tokens, Q-Scorer's regressor, LoRA and trainable parts, the training forward pass.
- `optimizer`: AdamW and cosine with warmup.
- `session`: `setup`, everything a run holds between setup and cleanup.
- `loop`: the step loop and when checkpoints are written.
- `evaluation`: the test split scored in the loop.
- `state`: the run directory (resumable checkpoints, the log, the final files).
- `run`: `train(config)`, the entry point.
"""

from iqa_cli.training.config import LAYOUTS, STRATEGIES, TrainConfig
from iqa_cli.training.loop import TrainResult
from iqa_cli.training.objectives import METHODS
from iqa_cli.training.run import TrainInterrupted, train

__all__ = ["LAYOUTS", "METHODS", "STRATEGIES", "TrainConfig", "TrainInterrupted", "TrainResult", "train"]
