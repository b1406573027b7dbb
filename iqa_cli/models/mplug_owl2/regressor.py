"""The Q-Scorer regression head of mPLUG-Owl2 checkpoints (`deepmlp.*`): the shared `ScoreRegressor`.

Released Q-Scorer checkpoints hold it as `deepmlp.model.{i}.linear` and `deepmlp.output_layer`; the class and
its key names live in `iqa_cli.models.score_regressor`, which every family uses.
"""

from iqa_cli.models.score_regressor import DEFAULT_HIDDEN_DIMS, ResidualReLUBlock, ScoreRegressor

__all__ = ["DEFAULT_HIDDEN_DIMS", "ResidualReLUBlock", "ScoreRegressor"]
