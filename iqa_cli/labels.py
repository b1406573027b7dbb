"""Quality levels and soft labels built from human opinion scores.

DeQA-Score (CVPR 2025) discretizes a score distribution N(mu, s^2) over K quality levels (paper Eq. 1-2,
appendix B.1) and recovers mean and std from the level probabilities (Eq. 3); Q-Align uses a one-hot
level instead. Everything here works on whole columns (N rows at once) with numpy/scipy, so a dataset of
millions of images is labelled in seconds.

Facts taken from the reference `build_soft_labels/gen_soft_label.py` (DeQA-Score repository):
- scores are normalized to [1, 5] by the dataset's own min/max; std scales by the same factor;
- "cdf" mode integrates the Gaussian over [c - d/2, c + d/2], "pdf" mode takes its density at c;
- post-adjustment `p = alpha * p_raw + beta` with alpha, beta from sum 1 and mean mu, then negatives -> 0;
- fallback to linear interpolation between the two nearest centers (appendix Eq. A2) when
  `std_n < 0.2` or the adjusted label's recovered mean misses mu by more than 0.1; fallback rows count
  alpha = 1, beta = 0 in the alpha/beta statistics;
- the one-hot level is the interval of the uniformly divided [min, max] range that holds the MOS,
  right-closed with a 1e-8 tolerance (a MOS on a boundary belongs to the lower level);
- JS divergence between Gaussians uses the Gaussian with the averaged variance as midpoint (as the
  reference's `cal_distribution_gap.py`), the Wasserstein-2 distance is sqrt(dmu^2 + dsigma^2).

Two label rules (`iqa prepare --label-rule`):
- "reference" (default) is `gen_soft_label.py` exactly, so labels equal the ones the released models were
  trained on: alpha = (mu - 3) / (B - 3 A + 1e-9) with A = sum p_raw, B = sum p_raw c; negatives clipped
  to 0 and the label left as it is (its sum may exceed 1); fallback when `std_n < thr_std` or the clipped
  label's mean misses mu by more than thr_diff; the fallback interpolates over intervals widened by 1e-8
  on both sides. Sums run over the levels from the highest to the lowest, left to right, as numpy sums
  the reference's excellent-first lists, so the floats are the reference's bit for bit. One addition: a
  row whose label is not finite (std 0 with `--std-threshold 0`; the reference writes NaN) falls back.
- "renormalized" departs in three places (generalisations the reference never needs with its
  continuous MOS): a label clipped at zero is renormalized to sum 1 and the fallback test uses the label as
  stored; alpha comes from the closed form `alpha * A = (mu - m) / (mean_raw - m)` without the `+1e-9`,
  which turns every label with mu == 3 into the uniform distribution (within 1e-4 of m the even, smooth
  weight is taken at m + 1e-4); the two-point interpolation is exact Eq. A2.

Histogram labels (`iqa prepare --soft-labels histogram`, AVA's votes): a dataset whose ratings are counted per rating
(AVA's 10 counts of about 210 votes) has its measured distribution. Each rating r of the scale [lo, hi] covers the
interval [r - 1/2, r + 1/2] of the rating axis, its votes spread evenly over it; rescaled to [1, 5] by the same
affine map as the MOS, the mass of that piecewise-uniform density in each level's interval [c - d/2, c + d/2] is
the level's probability: the cdf integration of the Gaussian labels, applied to the histogram instead of
N(mu, s^2), without post-adjustment (the label is measured, not fitted). The outer levels also take what lies
beyond them (nothing on AVA's scale: its bins end at 1 - 2/9 and 5 + 2/9). With K = 10 levels on AVA the label is
the histogram itself.

The statistics (`label_statistics`) are the reference's printed ones under either rule: srcc/plcc of the
recovered mean vs mu, `[raw_diff]` L1/L2 of the unadjusted Gaussian's sum p_raw c (not divided by sum
p_raw), `[diff]` L1/L2 after adjustment and fallback, alpha/beta mean and std, and the fallback count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from iqa_cli.errors import UserError
from iqa_cli.gaussians import gaussian_js_moment, gaussian_w2
from iqa_cli.prepare_config import (  # the options' choices and defaults, declared with the flags
    DEFAULT_LABEL_RULE,
    DEFAULT_MEAN_THRESHOLD,
    DEFAULT_STD_THRESHOLD,
    DENSITIES,
    LABEL_RULES,
    MAX_LEVELS,
    MIN_LEVELS,
)

QUALITY_NAMES = ("bad", "poor", "fair", "good", "excellent")
NUMBER_NAMES = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
NAME_SETS = {"quality": QUALITY_NAMES, "numbers": NUMBER_NAMES}
SCORE_LO, SCORE_HI = 1.0, 5.0

_BOUNDARY_EPS = 1e-8  # the reference's tolerance on level boundaries
_SIGMA_FLOOR = 1e-8  # a point mass (std 0) is a Gaussian this narrow in JS/KL
_SYMMETRY_BAND = 1e-4  # |mu - m| below this: alpha taken at m + band (0/0 otherwise)
_ALPHA_EPS = 1e-9  # the reference's term in alpha's denominator
_SQRT_2PI = float(np.sqrt(2 * np.pi))  # scipy.stats.norm's constant (its pdf divides by it, then by scale)
_ROUNDING = 1e-12  # adjusted entries above -_ROUNDING are rounding noise, not clipping


def check_levels(k: int) -> int:
    """K must be an integer in 2..12 (the name sets and the level tokens stop there)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not MIN_LEVELS <= k <= MAX_LEVELS:
        raise UserError(f"number of levels must be an integer from {MIN_LEVELS} to {MAX_LEVELS}, got {k!r}")
    return int(k)


def level_centers(k: int = 5) -> np.ndarray:
    """Centers c_i = 1 + 4 (i - 1) / (K - 1), evenly spaced over [1, 5], ascending quality. Shape (K,)."""
    k = check_levels(k)
    return SCORE_LO + (SCORE_HI - SCORE_LO) * np.arange(k, dtype=np.float64) / (k - 1)


def level_width(k: int = 5) -> float:
    """Distance d between neighbouring centers (1.0 for K = 5)."""
    return (SCORE_HI - SCORE_LO) / (check_levels(k) - 1)


def level_names(k: int = 5, names: str | Sequence[str] | None = None) -> list[str]:
    """Names of the K levels, ascending quality.

    Args:
        k: number of levels.
        names: None (the common five for K = 5, else "one".."K"), a set name ("quality", "numbers"),
            a comma-separated string, or a list of K distinct names.
    """
    k = check_levels(k)
    if names is None:
        return list(QUALITY_NAMES) if k == len(QUALITY_NAMES) else list(NUMBER_NAMES[:k])
    if isinstance(names, str):
        key = names.strip().lower()
        if key in NAME_SETS:
            chosen = NAME_SETS[key]
            if len(chosen) < k or (key == "quality" and k != len(chosen)):
                raise UserError(f"level name set {key!r} has {len(chosen)} names; it does not fit {k} levels")
            return list(chosen[:k])
        names = names.split(",")
    cleaned = [str(n).strip() for n in names]
    if len(cleaned) != k:
        raise UserError(f"{k} levels need {k} level names, got {len(cleaned)}: {','.join(cleaned)}")
    if any(not n for n in cleaned):
        raise UserError(f"empty level name in {','.join(cleaned)!r}")
    if len(set(cleaned)) != k:
        raise UserError(f"level names must be distinct, got {','.join(cleaned)}")
    return cleaned


def score_range(mos: np.ndarray) -> tuple[float, float]:
    """min/max of a MOS column, the range scores are normalized by (docs/METHOD.md, "Scores")."""
    mos = np.asarray(mos, dtype=np.float64)
    if mos.size == 0:
        raise UserError("no scores to normalize")
    lo, hi = float(np.min(mos)), float(np.max(mos))
    if not hi > lo:
        raise UserError(f"all {mos.size} MOS values equal {lo:g}; a score range is needed to normalize")
    return lo, hi


def normalize_scores(
    mos: np.ndarray,
    std: np.ndarray | None = None,
    *,
    lo: float,
    hi: float,
    lower_is_better: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Maps MOS onto [1, 5] (flipped first for DMOS-like scores) and scales std by the same factor.

    `4 * (mos - lo) / (hi - lo) + 1` and `4 * std / (hi - lo)`, in the reference's order of operations.
    """
    mos = np.asarray(mos, dtype=np.float64)
    span = SCORE_HI - SCORE_LO
    shifted = hi - mos if lower_is_better else mos - lo
    mos_n = span * shifted / (hi - lo) + SCORE_LO
    std_n = None if std is None else span * np.asarray(std, dtype=np.float64) / (hi - lo)
    return mos_n, std_n


def one_hot_levels(mos: np.ndarray, k: int = 5, lo: float = SCORE_LO, hi: float = SCORE_HI) -> np.ndarray:
    """Q-Align's level: the right-closed interval of [lo, hi] cut into K equal parts that holds the MOS.

    Returns 0-based level indices, int64 (N,). A MOS on a boundary (within 1e-8) takes the lower level.
    """
    k = check_levels(k)
    mos = np.asarray(mos, dtype=np.float64)
    rights = lo + np.arange(1, k + 1, dtype=np.float64) / k * (hi - lo) + _BOUNDARY_EPS  # (K,)
    return np.minimum(np.searchsorted(rights, mos, side="left"), k - 1).astype(np.int64)


def gaussian_level_probs(mu: np.ndarray, s: np.ndarray, k: int = 5, density: str = "cdf") -> np.ndarray:
    """Raw level probabilities of N(mu, s^2), before post-adjustment (paper Eq. 1). Shape (N, K).

    "cdf": Phi((c + d/2 - mu) / s) - Phi((c - d/2 - mu) / s); "pdf": the Gaussian density at c, in
    scipy.stats.norm's order of operations (the reference's numbers to the last bit). Rows with s <= 0
    are NaN, as scipy gives them; `soft_labels` sends them to the fallback.
    """
    if density not in DENSITIES:
        raise UserError(f"density must be one of {', '.join(DENSITIES)}, got {density!r}")
    centers = level_centers(k)
    mu = np.asarray(mu, dtype=np.float64)[:, None]  # N, 1
    s = np.asarray(s, dtype=np.float64)[:, None]
    # each step in place on one (N, K + 1) buffer: the same operations in the same order, without five
    # fresh N x K arrays (their page faults cost as much as the arithmetic)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if density == "cdf":
            half = level_width(k) / 2
            edges = np.append(centers - half, centers[-1] + half)  # K + 1
            cdf = np.subtract(edges[None, :], mu)  # N, K + 1
            np.divide(cdf, s, out=cdf)
            from scipy import special  # here: scoring imports this module for its level names, and scipy costs 0.13 s

            special.ndtr(cdf, out=cdf)
            raw = np.subtract(cdf[:, 1:], cdf[:, :-1])  # np.diff
        else:
            raw = np.subtract(centers[None, :], mu)  # z, N x K
            np.divide(raw, s, out=raw)
            np.square(raw, out=raw)
            np.negative(raw, out=raw)
            np.divide(raw, 2.0, out=raw)
            np.exp(raw, out=raw)
            np.divide(raw, _SQRT_2PI, out=raw)
            np.divide(raw, s, out=raw)  # exp(-(z**2) / 2) / sqrt(2 pi) / s
    raw[~(s[:, 0] > 0)] = np.nan
    return raw


def level_sums(probs: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """Per row sum p_i (or sum p_i v_i) from the highest level to the lowest, left to right: the order in
    which numpy's `sum` and `inner` add the reference's excellent-first 5-element lists."""
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    total = probs[:, k - 1].copy() if values is None else probs[:, k - 1] * values[k - 1]
    scratch = np.empty_like(total)  # the same additions, in place
    for i in range(k - 2, -1, -1):
        total += probs[:, i] if values is None else np.multiply(probs[:, i], values[i], out=scratch)
    return total


def widened_interpolation_labels(mu: np.ndarray, k: int = 5) -> np.ndarray:
    """The reference's two-point label (`get_binary_probs`): interpolation over each interval between
    neighbouring centers widened by 1e-8 on both sides, the first interval holding mu. Shape (N, K)."""
    k = check_levels(k)
    mu = np.asarray(mu, dtype=np.float64)
    steps = np.arange(k - 1, dtype=np.float64)
    span = SCORE_HI - SCORE_LO
    lefts = SCORE_LO + steps / (k - 1) * span - _BOUNDARY_EPS  # the reference's expressions, same rounding
    rights = SCORE_LO + (steps + 1) / (k - 1) * span + _BOUNDARY_EPS
    lower = np.clip(np.searchsorted(rights, mu, side="left"), 0, k - 2)
    left, right = lefts[lower], rights[lower]
    probs = np.zeros((mu.shape[0], k), dtype=np.float64)
    rows = np.arange(mu.shape[0])
    probs[rows, lower] = (right - mu) / (right - left)
    probs[rows, lower + 1] = (mu - left) / (right - left)
    return probs


def interpolation_labels(mu: np.ndarray, k: int = 5) -> np.ndarray:
    """Two-point label between the two nearest centers, exact mean mu (appendix Eq. A2). Shape (N, K)."""
    k = check_levels(k)
    mu = np.asarray(mu, dtype=np.float64)
    t = (mu - SCORE_LO) / level_width(k)
    lower = np.clip(np.floor(t), 0, k - 2).astype(np.int64)
    upper_weight = np.clip(t - lower, 0.0, 1.0)
    probs = np.zeros((mu.shape[0], k), dtype=np.float64)
    rows = np.arange(mu.shape[0])
    probs[rows, lower] = 1.0 - upper_weight
    probs[rows, lower + 1] = upper_weight
    return probs


def recover_moments(probs: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean sum p_i c_i and std sqrt(sum p_i (c_i - mean)^2) of level probabilities (paper Eq. 3)."""
    probs = np.asarray(probs, dtype=np.float64)
    centers = level_centers(probs.shape[1] if k is None else k)
    mean = probs @ centers
    spread = np.subtract(centers[None, :], mean[:, None])  # (c - mean)^2 p, in place
    np.square(spread, out=spread)
    var = np.multiply(probs, spread, out=spread).sum(axis=1)
    return mean, np.sqrt(np.maximum(var, 0.0))


def _uniform_mix_weight(raw: np.ndarray, mu: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """a = alpha * sum(p_raw): the label is a * p_raw / sum(p_raw) + (1 - a) / K, with mean mu."""
    mid = centers.mean()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        raw_mean = (raw @ centers) / raw.sum(axis=1)
        return (mu - mid) / (raw_mean - mid)


@dataclass(frozen=True)
class SoftLabels:
    """Soft labels of N rows and how each was made.

    Attributes:
        probs: final labels, float64 (N, K), ascending quality.
        raw: Gaussian level probabilities before post-adjustment (N, K).
        alpha, beta: post-adjustment coefficients (1 and 0 on fallback rows, as the reference counts them).
        fallback: rows that took the two-point interpolation.
        clipped: rows whose adjusted label had entries below -1e-12 set to 0 (before the fallback test).
    """

    probs: np.ndarray
    raw: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    fallback: np.ndarray
    clipped: np.ndarray


def check_label_rule(rule: str) -> str:
    if rule not in LABEL_RULES:
        raise UserError(f"label rule must be one of {', '.join(LABEL_RULES)}, got {rule!r}")
    return rule


def soft_labels(
    mu: np.ndarray,
    s: np.ndarray,
    k: int = 5,
    *,
    density: str = "cdf",
    std_threshold: float = DEFAULT_STD_THRESHOLD,
    mean_threshold: float = DEFAULT_MEAN_THRESHOLD,
    rule: str = DEFAULT_LABEL_RULE,
) -> SoftLabels:
    """DeQA-Score soft labels for normalized scores mu and stds s on [1, 5] (paper Eq. 1-2, appendix B.1).

    Args:
        mu, s: normalized MOS and std, shape (N,). s may be 0 (the row falls back).
        k: number of levels.
        density: "cdf" or "pdf".
        std_threshold: rows with s below it take the two-point interpolation.
        mean_threshold: rows whose adjusted label's recovered mean misses mu by more than this fall back.
        rule: "reference" (`gen_soft_label.py` bit for bit) or "renormalized" (see the module docstring).
    """
    k = check_levels(k)
    check_label_rule(rule)
    mu = np.asarray(mu, dtype=np.float64).reshape(-1)
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    if mu.shape != s.shape:
        raise ValueError(f"mu and s differ in length: {mu.shape} vs {s.shape}")
    centers = level_centers(k)
    mid = centers.mean()
    raw = gaussian_level_probs(mu, s, k, density)  # N, K
    if rule == "reference":
        return _reference_labels(mu, s, raw, centers, std_threshold, mean_threshold)

    total = raw.sum(axis=1)
    weight = _uniform_mix_weight(raw, mu, centers)
    near = np.abs(mu - mid) < _SYMMETRY_BAND
    if near.any():
        shifted = np.full(int(near.sum()), mid + _SYMMETRY_BAND)
        weight[near] = _uniform_mix_weight(gaussian_level_probs(shifted, s[near], k, density), shifted, centers)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        alpha = weight / total
        beta = (1.0 - weight) / k
        adjusted = alpha[:, None] * raw + beta[:, None]  # N, K
        clipped = (adjusted < -_ROUNDING).any(axis=1)  # rounding noise is zeroed too, but not counted
        probs = np.maximum(adjusted, 0.0)
        if clipped.any():
            probs[clipped] /= probs[clipped].sum(axis=1, keepdims=True)
        miss = np.abs(probs @ centers - mu)
    fallback = (s < std_threshold) | ~(miss <= mean_threshold)
    if fallback.any():
        probs[fallback] = interpolation_labels(mu[fallback], k)
        alpha[fallback] = 1.0
        beta[fallback] = 0.0
    return SoftLabels(probs=probs, raw=raw, alpha=alpha, beta=beta, fallback=fallback, clipped=clipped)


def _reference_labels(
    mu: np.ndarray, s: np.ndarray, raw: np.ndarray, centers: np.ndarray, std_threshold: float, mean_threshold: float
) -> SoftLabels:
    """`gen_soft_label.py`'s per-row steps on whole columns, each float as the reference computes it."""
    k = centers.size
    mid = (SCORE_LO + SCORE_HI) / 2  # the reference's literal 3
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        total = level_sums(raw)  # A
        moment = level_sums(raw, centers)  # B
        alpha = (mu - mid) / (moment - mid * total + _ALPHA_EPS)
        beta = (1.0 - alpha * total) / k
        adjusted = np.multiply(raw, alpha[:, None])
        adjusted += beta[:, None]
        clipped = (adjusted < -_ROUNDING).any(axis=1)
        probs = np.maximum(adjusted, 0.0, out=adjusted)  # no renormalization: the sum may exceed 1
        diff = np.abs(level_sums(probs, centers) - mu)
    # NaN diff does not trigger the reference's test; such rows (s <= 0) are caught by the finiteness check
    fallback = (s < std_threshold) | (diff > mean_threshold) | ~np.isfinite(probs).all(axis=1)
    if fallback.any():
        probs[fallback] = widened_interpolation_labels(mu[fallback], k)
        alpha[fallback] = 1.0
        beta[fallback] = 0.0
    return SoftLabels(probs=probs, raw=raw, alpha=alpha, beta=beta, fallback=fallback, clipped=clipped)


def histogram_soft_labels(counts: np.ndarray, lo: float, hi: float, k: int = 5) -> SoftLabels:
    """Labels (N, K) from vote counts (N, R) of the ratings lo, lo + 1, ..., hi = lo + R - 1 (see the module
    docstring): each rating's votes spread over [r - 1/2, r + 1/2], rescaled to [1, 5], integrated over the levels'
    intervals. Rows sum to 1; `raw` is the label, alpha 1, beta 0, no fallback."""
    k = check_levels(k)
    counts = np.asarray(counts, dtype=np.float64)
    ratings = lo + np.arange(counts.shape[1], dtype=np.float64)
    if counts.ndim != 2 or not np.isclose(ratings[-1], hi):
        raise ValueError(f"{counts.shape[1]} vote counts do not cover the ratings {lo:g}..{hi:g}")
    scale = (SCORE_HI - SCORE_LO) / (hi - lo)
    left = SCORE_LO + (ratings - 0.5 - lo) * scale  # R: each rating's interval on [1, 5]
    right = SCORE_LO + (ratings + 0.5 - lo) * scale
    centers, half = level_centers(k), level_width(k) / 2
    low, high = centers - half, centers + half
    low[0], high[-1] = -np.inf, np.inf  # the outer levels take what lies beyond them
    overlap = np.clip(np.minimum(right[:, None], high[None]) - np.maximum(left[:, None], low[None]), 0, None)
    share = overlap / (right - left)[:, None]  # R, K: fraction of a rating's interval in each level
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = (counts @ share) / counts.sum(axis=1, keepdims=True)
    n = counts.shape[0]
    none = np.zeros(n, dtype=bool)
    return SoftLabels(probs=probs, raw=probs.copy(), alpha=np.ones(n), beta=np.zeros(n), fallback=none, clipped=none)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank (scipy's rankdata "average"), one quicksort."""
    x = np.asarray(x)
    order = np.argsort(x)
    ordered = x[order]
    starts_mask = np.empty(x.size, dtype=bool)
    starts_mask[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_mask[1:])
    starts = np.flatnonzero(starts_mask)
    counts = np.diff(np.append(starts, x.size))
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(starts + (counts + 1) / 2.0, counts)
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation in float64 (scipy.stats costs a second of start-up); None where undefined."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    r = float(dx @ dy / np.sqrt((dx @ dx) * (dy @ dy)))
    return _finite(min(max(r, -1.0), 1.0))


def _level_ranks(level: np.ndarray, k: int) -> np.ndarray:
    """average_ranks of the one-hot means centers[level], from the level counts instead of a sort: the
    centers increase with the level, so the rows of a level share ranks start + (count + 1) / 2."""
    level = np.asarray(level) % k  # centers[-1] is centers[k - 1]
    counts = np.bincount(level, minlength=k)
    starts = np.cumsum(counts) - counts
    return (starts + (counts + 1) / 2.0)[level]


def _recovery_stats(
    mu: np.ndarray,
    s: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    mu_ranks: np.ndarray,
    mean_ranks: np.ndarray | None = None,
) -> dict[str, float | None]:
    err = mean - mu
    plcc = _pearson(mean, mu)
    if mean_ranks is None and plcc is not None:
        mean_ranks = average_ranks(mean)
    srcc = _pearson(mean_ranks, mu_ranks) if plcc is not None else None  # spearmanr: exact ranks
    known = np.isfinite(s)  # rows without a std have no ground-truth Gaussian to compare with
    if not known.all():
        mu, s, mean, std = mu[known], s[known], mean[known], std[known]
    js = np.maximum(gaussian_js_moment(mu, np.maximum(s, _SIGMA_FLOOR), mean, np.maximum(std, _SIGMA_FLOOR)), 0.0)
    w2 = gaussian_w2(mu, s, mean, std)
    return {
        "l1": _finite(np.mean(np.abs(err))),
        "rmse": _finite(np.sqrt(np.mean(err**2))),
        "plcc": plcc,
        "srcc": srcc,
        "js": _finite(js.mean()) if js.size else None,
        "wasserstein": _finite(w2.mean()) if w2.size else None,
    }


def label_statistics(mu: np.ndarray, s: np.ndarray, labels: SoftLabels, level: np.ndarray) -> dict:
    """The paper's Tables 1-2 for one dataset: one-hot vs soft labels against N(mu, s^2).

    The reference's printed statistics map as: `srcc`/`plcc` -> soft.srcc/plcc, `[raw_diff] l1/l2` ->
    raw.l1/rmse, `[diff] l1/l2` -> soft.l1/rmse, `[alpha]`/`[beta]` -> alpha/beta, `binary / all` ->
    fallback / rows. Rows whose raw Gaussian is undefined (no std, std 0: the reference prints nan) are
    left out of raw.l1/rmse.

    Args:
        mu, s: normalized MOS and std (N,); s is NaN where the dataset has no std (left out of JS/W).
        labels: the soft labels of these rows.
        level: one-hot level indices (N,), 0-based.

    Returns:
        {"rows", "std_rows", "one_hot": {...}, "soft": {...}, "raw": {"l1", "rmse"}, "alpha": {"mean",
        "std"}, "beta": {...}, "fallback", "clipped"}; one_hot/soft hold l1, rmse, plcc, srcc of the
        recovered mean and mean js, wasserstein; undefined values are None.
    """
    mu = np.asarray(mu, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    k = labels.probs.shape[1]
    centers = level_centers(k)
    soft_mean = level_sums(labels.probs, centers)  # the reference's mos_rec, same floats
    _, soft_std = recover_moments(labels.probs)
    one_hot_mean = centers[np.asarray(level)]
    raw_err = level_sums(labels.raw, centers) - mu  # not divided by sum p_raw, as the reference
    mu_ranks = average_ranks(mu)  # SRCC = PLCC of ranks; the MOS is ranked once for both label kinds
    raw_ok = np.isfinite(raw_err)
    return {
        "rows": int(mu.size),
        "std_rows": int(np.isfinite(s).sum()),
        "one_hot": _recovery_stats(mu, s, one_hot_mean, np.zeros_like(mu), mu_ranks, _level_ranks(level, k)),
        "soft": _recovery_stats(mu, s, soft_mean, soft_std, mu_ranks),
        "raw": {
            "l1": _finite(np.mean(np.abs(raw_err[raw_ok]))) if raw_ok.any() else None,
            "rmse": _finite(np.sqrt(np.mean(raw_err[raw_ok] ** 2))) if raw_ok.any() else None,
        },
        "alpha": {"mean": _finite(np.mean(labels.alpha)), "std": _finite(np.std(labels.alpha))},
        "beta": {"mean": _finite(np.mean(labels.beta)), "std": _finite(np.std(labels.beta))},
        "fallback": int(labels.fallback.sum()),
        "clipped": int((labels.clipped & ~labels.fallback).sum()),
    }
