"""Closed-form distances between 1-D Gaussians, per row, for label statistics and evaluation alike.

Kept apart from `metrics` (which pulls in scipy.stats and optimize) so that `labels` can use them
without the start-up cost.
"""

import numpy as np


def _as_float64(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(a, dtype=np.float64) for a in arrays)


def gaussian_kl(mu_p: np.ndarray, std_p: np.ndarray, mu_q: np.ndarray, std_q: np.ndarray) -> np.ndarray:
    """Per-row KL(P || Q) for P = N(mu_p, std_p^2), Q = N(mu_q, std_q^2), in nats (closed form)."""
    mu_p, std_p, mu_q, std_q = _as_float64(mu_p, std_p, mu_q, std_q)
    return np.log(std_q / std_p) + (std_p**2 + (mu_p - mu_q) ** 2) / (2.0 * std_q**2) - 0.5


def gaussian_w2(mu_p: np.ndarray, std_p: np.ndarray, mu_q: np.ndarray, std_q: np.ndarray) -> np.ndarray:
    """Per-row 2-Wasserstein distance between 1-D Gaussians: sqrt((mu_p - mu_q)^2 + (std_p - std_q)^2)."""
    mu_p, std_p, mu_q, std_q = _as_float64(mu_p, std_p, mu_q, std_q)
    return np.sqrt((mu_p - mu_q) ** 2 + (std_p - std_q) ** 2)


def gaussian_js_moment(mu_p: np.ndarray, std_p: np.ndarray, mu_q: np.ndarray, std_q: np.ndarray) -> np.ndarray:
    """DeQA-Score's JS: the mixture replaced by N((mu_p + mu_q)/2, (std_p^2 + std_q^2)/2), closed form.

    This is what `cal_distribution_gap.py` reports (its KL adds eps=1e-8, negligible here). It is not the
    Jensen-Shannon divergence (it is unbounded for distant means); `gaussian_js` is. Kept so that numbers
    compare with the paper's tables.
    """
    mu_p, std_p, mu_q, std_q = _as_float64(mu_p, std_p, mu_q, std_q)
    mu_m, std_m = 0.5 * (mu_p + mu_q), np.sqrt(0.5 * (std_p**2 + std_q**2))
    return 0.5 * gaussian_kl(mu_p, std_p, mu_m, std_m) + 0.5 * gaussian_kl(mu_q, std_q, mu_m, std_m)
