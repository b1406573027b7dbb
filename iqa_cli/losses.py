"""Training losses of DeQA-Score, Q-Align and Q-Scorer, each a short pure function.

Conventions shared by every function here:

- Levels are in ascending quality (`bad .. excellent`): `level_token_ids[k]` is the token of level k and
  `centers[k] = 1 + 4 k / (K - 1)` its score. The reference code lists them descending with weights
  `[5, 4, 3, 2, 1]`; the sums are the same.
- `logits[B, T, V]` are aligned with `labels[B, T]` the Hugging Face way: `logits[:, t]` is the model output at
  input token t, so it predicts `labels[:, t + 1]`. With mPLUG-Owl2 the caller gathers the text positions
  (`MPLUGOwl2Output.text_positions`) so that the 64 visual tokens drop out.
- Everything is computed in float32 whatever the logits' dtype (bf16 under autocast), with log-softmax
  rather than log(softmax), and returns a float32 scalar that keeps the graph even when a term is empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from iqa_cli.constants import IGNORE_INDEX

# eps of the reference's fidelity loss; "eps=0 is unable to step" (the DeQA-Score model's forward).
FIDELITY_EPS = 1e-8
# The reference stops pushing probability onto the level tokens once they hold 99% of it.
IN_LEVEL_FLOOR = 0.01
# Normalization guard of the norm-in-norm loss (Li et al. 2020's code uses the same value).
NORM_EPS = 1e-8
# Regressor output range the Q-Scorer reference clamps to, in training and in scoring.
QSCORER_CLAMP = (0.0, 5.0)


def _ids(level_token_ids: Sequence[int] | Tensor, device: torch.device) -> Tensor:
    return torch.as_tensor(level_token_ids, dtype=torch.long, device=device)


def _centers(k: int, device: torch.device) -> Tensor:
    """Level centers evenly spaced over [1, 5] (the same rule as `iqa_cli.labels.level_centers`)."""
    return torch.linspace(1.0, 5.0, k, dtype=torch.float32, device=device)


def _zero(like: Tensor) -> Tensor:
    """A float32 zero that stays attached to `like`'s graph, for empty loss terms."""
    return like.float().sum() * 0.0


def _phi(x: Tensor) -> Tensor:
    """Standard normal CDF."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def level_positions(labels: Tensor, level_token_ids: Sequence[int] | Tensor) -> Tensor:
    """Index in each row of `labels` of the first level token, for `soft_label_kl` and the CE exclusion.

    The reference finds the level by searching for the response prefix ("The quality of the image is");
    the first level id among the supervised labels is the same token for the response template.

    Args:
        labels: [B, T] next-token labels, `IGNORE_INDEX` outside the response.
        level_token_ids: the K level token ids.

    Returns:
        LongTensor [B].

    Raises:
        ValueError: a row has no level token among its labels.
    """
    is_level = torch.isin(labels, _ids(level_token_ids, labels.device))  # B, T
    missing = ~is_level.any(dim=1)
    if missing.any():
        rows = missing.nonzero().flatten().tolist()
        raise ValueError(f"no level token among the labels of batch rows {rows}")
    return is_level.int().argmax(dim=1)


def soft_label_kl(logits: Tensor, level_token_ids: Sequence[int] | Tensor, soft_labels: Tensor) -> Tensor:
    """KL(soft label || model) at the level position (DeQA-Score Eq. 4, the soft-label loss L_KL).

    The model side is the softmax over the WHOLE vocabulary, so the loss also pulls probability mass off
    every non-level token; the soft label puts its mass only on the K level tokens. Reduction is the
    reference's `F.kl_div(..., reduction="batchmean")`: summed over the vocabulary, divided by B.

    Args:
        logits: [B, V] logits at the position that predicts the level token (label index - 1).
        level_token_ids: the K level token ids, ascending quality.
        soft_labels: [B, K] soft labels in the same order, each row summing to 1.
    """
    log_q = torch.log_softmax(logits.float(), dim=-1)[:, _ids(level_token_ids, logits.device)]  # B, K
    p = soft_labels.to(device=logits.device, dtype=torch.float32).detach()
    return (torch.xlogy(p, p) - p * log_q).sum() / logits.shape[0]


def response_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    exclude_mask: Tensor | None = None,
) -> Tensor:
    """Next-token cross entropy on the response tokens (DeQA-Score Eq. 5, the CE beside L_KL).

    Mean over all supervised tokens of the batch (the reference flattens B x T into one
    `CrossEntropyLoss()`), not a mean of per-sequence means. With the soft-label KL the reference drops the
    level token from this CE, which is what `exclude_mask` does: it removes the pair (logit at t - 1,
    label at t) for every marked label position t, exactly the reference's deletion of that label and of
    the logit that predicts it. An empty selection gives 0 (the reference would give NaN).

    Args:
        logits: [B, T, V], aligned with `labels` (position t predicts label t + 1).
        labels: [B, T].
        ignore_index: label value that is not supervised.
        exclude_mask: [B, T] bool over label positions to leave out (the level token), or None.
    """
    shift_labels = labels[:, 1:]  # B, T-1
    keep = shift_labels != ignore_index
    if exclude_mask is not None:
        keep = keep & ~exclude_mask[:, 1:].to(keep.device)
    n = int(keep.sum())
    if n == 0:
        return _zero(logits)
    picked = logits[:, :-1][keep].float()  # N, V (only the supervised rows are upcast)
    return F.cross_entropy(picked, shift_labels[keep], reduction="sum") / n


def onehot_level_ce(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Q-Align's loss: plain next-token CE on the whole response, one-hot level token included.

    The level token of the MOS interval sits in `labels` like any other response token; nothing is
    excluded (the Q-Align model's forward: `CrossEntropyLoss()` over the shifted labels).
    """
    return response_cross_entropy(logits, labels, ignore_index=ignore_index)


def level_distribution(
    logits_at_level: Tensor,
    level_token_ids: Sequence[int] | Tensor,
    centers: Tensor | None = None,
    closed_set: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Predicted level probabilities, mean and std (DeQA-Score Eq. 3 applied to the prediction).

    Closed-set (default, and what the released runs used: `--closeset_rating_loss True`) is a softmax over
    the K level logits only. Open-set takes the full-vocabulary probabilities of the level tokens without
    renormalizing them, as the reference does when `closeset_rating_loss` is False.

    Args:
        logits_at_level: [B, V] logits at the position that predicts the level token.
        level_token_ids: the K level token ids, ascending quality.
        centers: [K] level scores; default evenly spaced over [1, 5].
        closed_set: softmax over the K level logits (True) or over the whole vocabulary (False).

    Returns:
        probs [B, K], mean [B], std [B], all float32. The variance is floored at 1e-12 before the square root
        so that an exactly one-hot prediction still has a finite gradient.
    """
    ids = _ids(level_token_ids, logits_at_level.device)
    logits = logits_at_level.float()
    # B, K: renormalized over the levels (closed set) or their share of the whole vocabulary (open set)
    probs = torch.softmax(logits[:, ids], dim=-1) if closed_set else torch.softmax(logits, dim=-1)[:, ids]
    c = _centers(len(ids), probs.device) if centers is None else centers.to(probs.device, torch.float32)
    mean = probs @ c
    var = (probs * (c[None, :] - mean[:, None]) ** 2).sum(dim=-1)
    return probs, mean, var.clamp_min(1e-12).sqrt()


def fidelity_loss(
    mu_a: Tensor,
    s_a: Tensor,
    mu_b: Tensor,
    s_b: Tensor,
    pred_mu_a: Tensor,
    pred_s_a: Tensor | None,
    pred_mu_b: Tensor,
    pred_s_b: Tensor | None,
    eps: float = FIDELITY_EPS,
    detach_pred_std: bool = False,
) -> Tensor:
    """Thurstone fidelity loss on image pairs of one dataset (DeQA-Score Eq. 6-8).

    p = Phi((mu_A - mu_B) / sqrt(s_A^2 + s_B^2 + eps)) from the human scores (Eq. 6, no gradient),
    p_hat the same from the prediction (Eq. 7), L = 1 - sqrt(p p_hat + eps) - sqrt((1-p)(1-p_hat) + eps)
    (Eq. 8), mean over pairs. The ground-truth p is scale-free, so raw or normalized MOS/std give the same
    value as long as both use one scale.

    Pass `pred_s_a = pred_s_b = None` for the reference default (`use_fix_std=True`): both predicted stds
    fixed to 1, p_hat = Phi((mu_A - mu_B) / sqrt(2)) with no eps. With predicted stds (the paper's form)
    eps is added to the variance, and `detach_pred_std` stops its gradient as the released runs did.

    Args:
        mu_a, s_a, mu_b, s_b: [P] ground-truth mean and std of the two images of each pair.
        pred_mu_a, pred_s_a, pred_mu_b, pred_s_b: [P] predicted mean and std (stds None for fixed 1).
        eps: stabilizer inside the variances and both square roots (reference 1e-8).
        detach_pred_std: no gradient through the predicted variance.
    """
    if (pred_s_a is None) != (pred_s_b is None):
        raise ValueError("pass both predicted stds or neither (None = fixed std 1)")
    mu_a, s_a, mu_b, s_b = (t.to(device=pred_mu_a.device, dtype=torch.float32) for t in (mu_a, s_a, mu_b, s_b))
    z = ((mu_a - mu_b) / torch.sqrt(s_a**2 + s_b**2 + eps)).detach()
    delta = pred_mu_a.float() - pred_mu_b.float()
    if pred_s_a is None:
        z_hat = delta / math.sqrt(2.0)
    else:
        var = pred_s_a.float() ** 2 + pred_s_b.float() ** 2 + eps
        if detach_pred_std:
            var = var.detach()
        z_hat = delta / torch.sqrt(var)
    # 1 - Phi(z) taken as Phi(-z): in float32 1 - Phi(4.9) keeps only one significant digit
    p_p_hat = _phi(z) * _phi(z_hat)
    q_q_hat = _phi(-z) * _phi(-z_hat)
    return (1.0 - torch.sqrt(p_p_hat + eps) - torch.sqrt(q_q_hat + eps)).mean()


def in_level_loss(logits: Tensor, level_token_ids: Sequence[int] | Tensor, floor: float = IN_LEVEL_FLOOR) -> Tensor:
    """The reference's optional "in-level" loss: max(floor, mean_b(1 - sum_k softmax(logits_b)[level_k])).

    The floor is applied to the batch mean, not per image, so the gradient stops for the whole batch once
    the level tokens hold on average 99% of the full-vocabulary probability (not in the paper; reference
    `get_score`, off by default: `weight_in_level=None`).

    Args:
        logits: [B, V] logits at the position that predicts the level token.
        level_token_ids: the K level token ids.
        floor: lower bound of the loss (reference 0.01).
    """
    logits = logits.float()
    log_mass = torch.logsumexp(logits[:, _ids(level_token_ids, logits.device)], dim=-1) - torch.logsumexp(
        logits, dim=-1
    )
    return torch.clamp_min((1.0 - log_mass.exp()).mean(), floor)


@dataclass(frozen=True)
class LevelTargets:
    """Supervision of one side (A or B) of a DeQA-Score batch."""

    labels: Tensor  # B, T next-token labels, IGNORE_INDEX outside the response
    level_pos: Tensor  # B index in `labels` of the level token (see `level_positions`)
    soft_labels: Tensor  # B, K soft label, ascending quality
    mos: Tensor  # B ground-truth mean (any scale shared with `std`; only the pair ratio matters)
    std: Tensor  # B ground-truth std on the same scale


@dataclass(frozen=True)
class LossParts:
    """A total loss and its unweighted parts, for the backward pass and for logging."""

    total: Tensor

    def log_dict(self) -> dict[str, float]:
        """Every part as a float, no graph."""
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self)}


@dataclass(frozen=True)
class DeQALoss(LossParts):
    fidelity: Tensor  # L_fid over the pairs (0 without a B side)
    cross_entropy: Tensor  # CE(A) + CE(B), level token excluded
    kl: Tensor  # KL(A) + KL(B)
    in_level: Tensor  # in-level(A) + in-level(B), always computed, for logging


def _level_logits(logits: Tensor, level_pos: Tensor) -> Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, level_pos.to(logits.device) - 1]  # B, V: the position that predicts the level


def _position_mask(labels: Tensor, pos: Tensor) -> Tensor:
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[torch.arange(labels.shape[0], device=labels.device), pos.to(labels.device)] = True
    return mask


def deqa_loss(
    logits_a: Tensor,
    targets_a: LevelTargets,
    level_token_ids: Sequence[int] | Tensor,
    logits_b: Tensor | None = None,
    targets_b: LevelTargets | None = None,
    *,
    w_fid: float = 1.0,
    w_tok: float = 0.05,
    w_kl: float = 1.0,
    w_in_level: float = 0.0,
    fixed_std: bool = True,
    detach_pred_std: bool = True,
    closed_set: bool = True,
    centers: Tensor | None = None,
    eps: float = FIDELITY_EPS,
    ignore_index: int = IGNORE_INDEX,
) -> DeQALoss:
    """DeQA-Score training loss (Eq. 4-8): L = w_fid L_fid + w_tok (L_ce + w_kl L_kl) + w_in_level L_in_level.

    As in the reference's pair forward, the token terms (and the in-level term) are SUMMED over the two
    images of each pair, each side being a batch mean; the fidelity term is a mean over the pairs. Without
    a B side (no pairs) this is the reference's single-image loss w_tok (L_ce + w_kl L_kl). Defaults are the
    released runs' flags (`scripts/train.sh`): w_fid 1, w_tok 0.05, w_kl 1, fixed predicted std 1,
    closed-set level softmax, in-level loss off.

    Args:
        logits_a: [B, T, V] logits of the A images, aligned with `targets_a.labels`.
        targets_a: labels, level positions, soft labels, MOS and std of the A images.
        level_token_ids: the K level token ids, ascending quality.
        logits_b, targets_b: the same for the B image of each pair (same dataset as A), or None.
        w_fid, w_tok, w_kl, w_in_level: weights; see above.
        fixed_std: predicted std fixed to 1 in the fidelity loss (reference default) instead of the
            predicted one (paper).
        detach_pred_std: no gradient through the predicted std when it is used.
        closed_set: level probabilities for the fidelity mean/std from the K level logits only.
        centers: [K] level scores, default evenly spaced over [1, 5].
        eps: fidelity eps.
        ignore_index: unsupervised label value.
    """
    if (logits_b is None) != (targets_b is None):
        raise ValueError("pass both logits_b and targets_b, or neither")
    sides = [(logits_a, targets_a)] + ([(logits_b, targets_b)] if logits_b is not None else [])
    ce, kl, in_level, stats = [], [], [], []
    for logits, t in sides:
        level_logits = _level_logits(logits, t.level_pos)
        exclude = _position_mask(t.labels, t.level_pos)
        ce.append(response_cross_entropy(logits, t.labels, ignore_index=ignore_index, exclude_mask=exclude))
        kl.append(soft_label_kl(level_logits, level_token_ids, t.soft_labels))
        in_level.append(in_level_loss(level_logits, level_token_ids))
        stats.append(level_distribution(level_logits, level_token_ids, centers=centers, closed_set=closed_set))
    if logits_b is None:
        fid = _zero(logits_a)
    else:
        (_, mu_a, s_a), (_, mu_b, s_b) = stats
        fid = fidelity_loss(
            targets_a.mos,
            targets_a.std,
            targets_b.mos,
            targets_b.std,
            mu_a,
            None if fixed_std else s_a,
            mu_b,
            None if fixed_std else s_b,
            eps=eps,
            detach_pred_std=detach_pred_std,
        )
    ce_sum, kl_sum, in_sum = sum(ce), sum(kl), sum(in_level)
    total = w_fid * fid + w_tok * (ce_sum + w_kl * kl_sum) + w_in_level * in_sum
    return DeQALoss(total=total, fidelity=fid, cross_entropy=ce_sum, kl=kl_sum, in_level=in_sum)


def regression_mse(pred: Tensor, target: Tensor, clamp: tuple[float, float] | None = QSCORER_CLAMP) -> Tensor:
    """Q-Scorer's regression loss: mean over images of (clamp(pred) - target)^2.

    The reference clamps the MLP output to [0, 5] before the error in training (so no gradient flows once
    the output leaves the range) and divides the summed squared error over score-token positions by B,
    which is this mean with one score token per response. Targets are normalized MOS in [1, 5].

    Args:
        pred: [B] regressor outputs.
        target: [B] target scores.
        clamp: (low, high) applied to `pred`, or None.
    """
    pred = pred.float()
    if clamp is not None:
        pred = pred.clamp(clamp[0], clamp[1])
    return ((pred - target.to(pred.device, torch.float32)) ** 2).mean()


def norm_in_norm_loss(pred: Tensor, target: Tensor, p: float = 1.0, q: float = 2.0, eps: float = NORM_EPS) -> Tensor:
    """Norm-in-Norm loss (Li, Jiang & Jiang, ACM MM 2020), an option of Q-Scorer.

    Both vectors are centered and divided by their q-norm; the loss is ||pred' - target'||_p^p /
    (2^p N^max(0, 1 - p/q)), which lies in [0, 1]. It ignores any positive affine map of the prediction,
    so it trains ranking and linearity (PLCC), not the scale. Defaults p = 1, q = 2 are the defaults of the
    authors' LinearityIQA code. A batch of one gives 0 (with a graph), as there.

    Args:
        pred: [B] predictions.
        target: [B] target scores.
        p: norm of the error, >= 1.
        q: norm of the normalization, >= 1.
        eps: guard of the normalization.
    """
    if p < 1 or q < 1:
        raise ValueError(f"norm-in-norm needs p >= 1 and q >= 1, got p={p}, q={q}")
    pred = pred.float().reshape(-1)
    n = pred.numel()
    if n < 2:
        return _zero(pred)
    target = target.to(pred.device, torch.float32).reshape(-1)
    pc = pred - pred.mean()
    tc = target - target.mean()
    pn = pc / (eps + torch.linalg.vector_norm(pc, ord=q))
    tn = tc / (eps + torch.linalg.vector_norm(tc, ord=q))
    scale = 2.0 ** max(1.0, 1.0 / q) * n ** max(0.0, 1.0 / p - 1.0 / q)
    return (torch.linalg.vector_norm(pn - tn, ord=p) / scale) ** p


def pairwise_ranking_loss(pred: Tensor, target: Tensor, margin: float = 0.0, groups: Tensor | None = None) -> Tensor:
    """Margin ranking loss over every ordered pair of the batch, an option of Q-Scorer.

    mean over pairs (i, j) with target_i > target_j of max(0, margin - (pred_i - pred_j)); pairs with equal
    targets carry no order and are skipped. With `groups` (dataset ids) only pairs inside one dataset count.
    A batch without such pairs (e.g. one image) gives 0 with a graph.

    Args:
        pred: [B] predicted scores.
        target: [B] target scores.
        margin: how far apart a correctly ordered pair must be to cost nothing.
        groups: [B] integer group ids, or None.
    """
    pred = pred.float().reshape(-1)
    target = target.to(pred.device).reshape(-1)
    better = target[:, None] > target[None, :]  # B, B: i better than j
    if groups is not None:
        groups = groups.to(pred.device).reshape(-1)
        better = better & (groups[:, None] == groups[None, :])
    n = int(better.sum())
    if n == 0:
        return _zero(pred)
    gap = pred[:, None] - pred[None, :]  # B, B
    return F.relu(margin - gap)[better].sum() / n


def same_group_pairs(groups: Tensor) -> Tensor:
    """All pairs (i, j), i < j, of batch rows in the same group (dataset), for the fidelity loss.

    Returns:
        LongTensor [P, 2], possibly empty.
    """
    groups = groups.reshape(-1)
    same = (groups[:, None] == groups[None, :]).triu(diagonal=1)
    return same.nonzero()


@dataclass(frozen=True)
class QScorerLoss(LossParts):
    cross_entropy: Tensor  # level token excluded when the KL term is on
    mse: Tensor
    kl: Tensor  # 0 when w_kl is 0
    norm_in_norm: Tensor  # always computed, for logging
    ranking: Tensor  # always computed, for logging
    fidelity: Tensor  # 0 when w_fid is 0


def qscorer_loss(
    logits: Tensor,
    labels: Tensor,
    pred_score: Tensor,
    target_score: Tensor,
    *,
    score_token_ids: Sequence[int] | Tensor | None = None,
    score_pos: Tensor | None = None,
    soft_labels: Tensor | None = None,
    target_std: Tensor | None = None,
    groups: Tensor | None = None,
    w_tok: float = 0.05,
    w_mse: float = 1.0,
    w_kl: float = 0.0,
    w_nin: float = 0.0,
    w_rank: float = 0.0,
    w_fid: float = 0.0,
    margin: float = 0.0,
    nin_p: float = 1.0,
    nin_q: float = 2.0,
    clamp: tuple[float, float] | None = QSCORER_CLAMP,
    ignore_index: int = IGNORE_INDEX,
) -> QScorerLoss:
    """Q-Scorer training loss: L = w_tok (L_ce + w_mse L_mse + w_kl L_kl + w_nin L_nin + w_rank L_rank + w_fid L_fid).

    The reference trains CE + MSE only (`forward_mlp` adds them, `forward` multiplies the sum by
    `weight_next_token` = 0.05 from `scripts/train_lora.sh`), so w_tok scales every term; with AdamW the
    scale matters little. The other terms are the paper's options (no reference code): the soft-label KL on
    the score tokens (then the CE leaves the score token out, as DeQA-Score does), norm-in-norm
    (weight 0.5 in the paper), a margin ranking loss, and the fidelity loss with fixed std 1 on all
    same-dataset pairs of the batch (for multi-dataset training).

    Args:
        logits: [B, T, V] aligned with `labels`; the response holds one score token per row.
        labels: [B, T].
        pred_score: [B] regressor outputs (unclamped).
        target_score: [B] normalized MOS.
        score_token_ids: the K score token ids, ascending; needed with `soft_labels`.
        score_pos: [B] index of the score token in `labels`; found from `score_token_ids` when None.
        soft_labels: [B, K] soft labels over the score tokens, or None for no KL term.
        target_std: [B] std of the MOS on the same scale; needed when w_fid > 0.
        groups: [B] dataset ids: pairs for fidelity and ranking stay inside a dataset.
        w_tok, w_mse, w_kl, w_nin, w_rank, w_fid: weights; see above.
        margin: ranking margin.
        nin_p, nin_q: norm-in-norm norms.
        clamp: regressor clamp in the MSE (reference [0, 5]).
        ignore_index: unsupervised label value.
    """
    pred = pred_score.float().reshape(-1)
    kl = _zero(pred)
    exclude = None
    if w_kl:
        if soft_labels is None or score_token_ids is None:
            raise ValueError("the KL term needs soft_labels and score_token_ids")
        if score_pos is None:
            score_pos = level_positions(labels, score_token_ids)
        kl = soft_label_kl(_level_logits(logits, score_pos), score_token_ids, soft_labels)
        exclude = _position_mask(labels, score_pos)
    ce = response_cross_entropy(logits, labels, ignore_index=ignore_index, exclude_mask=exclude)
    mse = regression_mse(pred, target_score, clamp=clamp)
    nin = norm_in_norm_loss(pred, target_score, p=nin_p, q=nin_q)
    rank = pairwise_ranking_loss(pred, target_score, margin=margin, groups=groups)
    fid = _zero(pred)
    if w_fid:
        if target_std is None:
            raise ValueError("the fidelity term needs target_std")
        pairs = same_group_pairs(groups if groups is not None else torch.zeros_like(pred, dtype=torch.long))
        if len(pairs):
            i, j = pairs[:, 0], pairs[:, 1]
            t, s = target_score.to(pred.device), target_std.to(pred.device)
            fid = fidelity_loss(t[i], s[i], t[j], s[j], pred[i], None, pred[j], None)
    total = w_tok * (ce + w_mse * mse + w_kl * kl + w_nin * nin + w_rank * rank + w_fid * fid)
    return QScorerLoss(total=total, cross_entropy=ce, mse=mse, kl=kl, norm_in_norm=nin, ranking=rank, fidelity=fid)
