"""`iqa train`: fine-tune mPLUG-Owl2 or a transformers VLM with the DeQA-Score, Q-Align or Q-Scorer objective, or a
reasoning model with GRPO.

One module per concern, in the order a run uses them:

- `config`: the run configuration (nested dataclasses, built from the command-line options).
- `objectives`: deqa / qalign / qscorer, each with its default loss weights and its loss.
- `data`: prepared metas -> rows, the epoch order, pairs, prompts.
- `batches`: a row's image or video frames through the backbone's transform, and padded micro batches.
- `model`: level tokens, Q-Scorer's regressor, LoRA and trainable parts, the training forward pass.
- `optimizer`: AdamW and cosine with warmup.
- `session`: `setup`, everything a run holds between setup and cleanup.
- `loop`: the step loop and when checkpoints are written.
- `evaluation`: the test split scored in the loop.
- `grpo`, `grpo_loop`, `rewards`: `--method grpo` through TRL's GRPOTrainer, its callbacks and its rewards.
- `state`: the run directory (resumable checkpoints, the log, the final files).
- `run`: `train(config)`, the entry point.
"""

from iqa_cli import lazy_attributes

# The names load on first use: `iqa_cli.training.config` (what `iqa train --help` reads) needs no torch.
_LAZY = {
    "LAYOUTS": "iqa_cli.training.config",
    "STRATEGIES": "iqa_cli.training.config",
    "TrainConfig": "iqa_cli.training.config",
    "METHODS": "iqa_cli.training.objectives",
    "TrainResult": "iqa_cli.training.loop",
    "TrainInterrupted": "iqa_cli.training.run",
    "train": "iqa_cli.training.run",
}
__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
