"""The three training objectives: DeQA-Score, Q-Align and Q-Scorer.

Each owns its default loss weights (what `--w-fid`, `--w-tok` and `--w-kl` mean when not given), what it
needs from the run (image pairs, added score tokens, the regressor) and its loss on one micro batch. The
loss math itself is in `iqa_cli.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from iqa_cli.losses import QSCORER_CLAMP, LevelTargets, LossParts, deqa_loss, onehot_level_ce, qscorer_loss
from iqa_cli.reasoning import GRPO


@dataclass(frozen=True)
class QAlignLoss(LossParts):
    cross_entropy: torch.Tensor  # whole response, one-hot level token included


@dataclass(frozen=True)
class LossSpec:
    """What `compute_loss` needs besides the model output."""

    method: str
    level_ids: tuple[int, ...]  # the K tokens the levels are read at, ascending
    weights: dict[str, float]
    fixed_std: bool
    detach_pred_std: bool
    closed_set: bool
    w_in_level: float
    w_mse: float
    w_nin: float
    w_rank: float
    margin: float
    mse_clamp: bool = True


class Objective:
    """One method: its default weights, what it needs from the run, and its loss."""

    name: str
    default_weights: ClassVar[dict[str, float]]  # w_fid, w_tok, w_kl when the option is not given
    score_tokens = False  # reads levels at added `<scoreK>` tokens instead of the level words
    regressor = False  # trains an MLP on the hidden state before the level token

    def paired(self, weights: dict[str, float]) -> bool:
        """Whether a training sample is a pair of images."""
        return False

    def loss(self, spec: LossSpec, logits: torch.Tensor, pred: torch.Tensor | None, batch) -> LossParts:
        raise NotImplementedError


class DeQAScore(Objective):
    """Soft-label KL + CE on the level token, and the fidelity loss on image pairs (the reference's flags)."""

    name = "deqa"
    default_weights: ClassVar[dict[str, float]] = {"w_fid": 1.0, "w_tok": 0.05, "w_kl": 1.0}

    def paired(self, weights: dict[str, float]) -> bool:
        return weights["w_fid"] > 0  # without the fidelity term single images suffice

    def loss(self, spec: LossSpec, logits: torch.Tensor, pred: torch.Tensor | None, batch) -> LossParts:
        w, n = spec.weights, batch.pairs

        def side(rows: slice) -> LevelTargets:
            return LevelTargets(
                labels=batch.labels[rows],
                level_pos=batch.level_pos[rows],
                soft_labels=batch.soft_labels[rows],
                mos=batch.mos[rows],
                std=batch.std[rows],
            )

        kwargs = dict(
            w_fid=w["w_fid"],
            w_tok=w["w_tok"],
            w_kl=w["w_kl"],
            w_in_level=spec.w_in_level,
            fixed_std=spec.fixed_std,
            detach_pred_std=spec.detach_pred_std,
            closed_set=spec.closed_set,
        )
        if n:
            a, b = slice(0, n), slice(n, 2 * n)
            return deqa_loss(logits[a], side(a), spec.level_ids, logits[b], side(b), **kwargs)
        return deqa_loss(logits, side(slice(None)), spec.level_ids, **kwargs)


class QAlign(Objective):
    """Cross-entropy on the whole response, the one-hot level word included."""

    name = "qalign"
    default_weights: ClassVar[dict[str, float]] = {"w_fid": 0.0, "w_tok": 1.0, "w_kl": 0.0}

    def loss(self, spec: LossSpec, logits: torch.Tensor, pred: torch.Tensor | None, batch) -> LossParts:
        ce = onehot_level_ce(logits, batch.labels)
        return QAlignLoss(total=spec.weights["w_tok"] * ce, cross_entropy=ce)


class QScorer(Objective):
    """CE (+ optional KL) on added score tokens and an MSE-trained regressor (`losses.qscorer_loss`)."""

    name = "qscorer"
    default_weights: ClassVar[dict[str, float]] = {"w_fid": 0.0, "w_tok": 0.05, "w_kl": 0.0}
    score_tokens = True
    regressor = True

    def loss(self, spec: LossSpec, logits: torch.Tensor, pred: torch.Tensor | None, batch) -> LossParts:
        assert pred is not None
        w = spec.weights
        return qscorer_loss(
            logits,
            batch.labels,
            pred,
            batch.mos,
            score_token_ids=spec.level_ids,
            score_pos=batch.level_pos,
            soft_labels=batch.soft_labels,
            target_std=batch.std,
            groups=batch.group,
            w_tok=w["w_tok"],
            w_mse=spec.w_mse,
            w_kl=w["w_kl"],
            w_nin=spec.w_nin,
            w_rank=spec.w_rank,
            w_fid=w["w_fid"],
            margin=spec.margin,
            clamp=QSCORER_CLAMP if spec.mse_clamp else None,
        )


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (DeQAScore(), QAlign(), QScorer())}
METHODS = (*OBJECTIVES, GRPO)  # grpo trains a reasoning model through TRL (`training/grpo.py`): no loss here


def compute_loss(spec: LossSpec, logits: torch.Tensor, pred: torch.Tensor | None, batch) -> LossParts:
    """The method's loss on one micro batch; `logits` [N, T, V] are aligned with `batch.labels`."""
    return OBJECTIVES[spec.method].loss(spec, logits, pred, batch)
