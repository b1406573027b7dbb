"""The rewards of `iqa train --method grpo`, as pure functions of the parsed answers and the normalized MOS.

Scores and MOS are on the 1-5 scale of `iqa prepare`'s `mos_norm`. A batch's answers are ordered image by image,
each image's `G` answers together (TRL's `RepeatSampler` order). `answer_values` reads them with the preset's rule
(`iqa_cli.reasoning`); TRL sums the rewards with their weights and turns them into group-normalized advantages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from iqa_cli.reasoning import ReasoningPreset

FIDELITY_EPS = 1e-6  # VisualQuality-R1's `esp`, inside every square root


def answer_values(texts: Sequence[str], preset: ReasoningPreset) -> list[float | None]:
    """The number each answer gives by the preset's rule, None where it gives none."""
    values = []
    for text in texts:
        answer = preset.parse(text)
        values.append(None if answer is None else answer.value)
    return values


def threshold_rewards(values: Sequence[float | None], mos: Sequence[float], threshold: float = 0.35) -> list[float]:
    """Q-Insight's score reward: r = 1 if |s - mos| < threshold else 0; an answer without a number earns 0.

    (Q-Insight, Li et al. 2025, arXiv 2503.22679: `score_reward` of `qinsight_multi_task.py`, threshold 0.35 on the
    normalized 1-5 scale; the JSON "rating" is read by the preset.)
    """
    return [0.0 if v is None else float(abs(v - m) < threshold) for v, m in zip(values, mos, strict=True)]


def fidelity_rewards(values: Sequence[float], mos: Sequence[float], group: int) -> list[float]:
    """VisualQuality-R1's ranking reward (Wu et al. 2025, arXiv 2505.14460; `accuracy_reward` of `grpo_jsonl.py`).

    For answer j of image i and every other image k of the batch:

        p = Phi((s_ij - mean_k) / sqrt(var_i + var_k + eps))      (Thurstone: P(image i better than image k))
        g = 1 if mos_i > mos_k, 0 if mos_i < mos_k, 1/2 if equal
        r = sqrt(p g + eps) + sqrt((1 - p)(1 - g) + eps)          (the fidelity of p to g)

    and the reward is the mean of r over the other images. mean_k and var_k are over image k's G answers (var
    with G - 1 in the denominator, as torch.var), var_i over image i's own. Needs two images at least.
    """
    s = np.asarray(values, dtype=np.float64).reshape(-1, group)  # N, G
    m = np.asarray(mos, dtype=np.float64).reshape(-1, group)[:, 0]  # N: one MOS per image
    n = s.shape[0]
    if n < 2:
        raise ValueError("the fidelity reward compares an image with the others of its batch: it needs two at least")
    mean, var = s.mean(1), s.var(1, ddof=1)
    rewards = np.zeros_like(s)
    for i in range(n):
        others = np.arange(n) != i
        z = (s[i][:, None] - mean[others][None]) / np.sqrt(var[i] + var[others][None] + FIDELITY_EPS)  # G, N-1
        p = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
        g = np.where(m[i] > m[others], 1.0, np.where(m[i] < m[others], 0.0, 0.5))[None]
        r = np.sqrt(p * g + FIDELITY_EPS) + np.sqrt((1 - p) * (1 - g) + FIDELITY_EPS)
        rewards[i] = r.mean(1)
    return rewards.reshape(-1).tolist()


def fill_unparsed(values: Sequence[float | None], rng: np.random.Generator) -> list[float]:
    """VisualQuality-R1 gives an answer without a number a random integer 1..5 (`extract_first_number`); here it
    comes from a generator the caller seeds (by seed and step: a resumed run draws the same)."""
    return [float(rng.integers(1, 6)) if v is None else v for v in values]


def format_rewards(texts: Sequence[str], preset: ReasoningPreset) -> list[float]:
    """1 when the whole answer has the preset's shape (`<think>...</think><answer>...</answer>`; Q-Insight also
    asks for the line breaks and a JSON object), else 0."""
    return [float(preset.well_formed(text)) for text in texts]


def _erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return erf(x)
