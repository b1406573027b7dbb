"""Agreement between predicted and human quality scores: correlations, errors, distribution gaps.

Correlations follow the IQA papers and their reference code (DeQA-Score `src/evaluate`, pyiqa
`pyiqa/metrics/correlation_coefficient.py`): PLCC on raw scores and after the VQEG 4-parameter
logistic mapping, SRCC, KRCC (tau-b), RMSE. Distribution gaps compare the predicted N(score, std^2)
with the human N(mos_norm, std_norm^2) row by row and average over rows, as DeQA-Score's
`cal_distribution_gap.py` does, with KL taken in the same direction, KL(human || predicted).

Every function takes 1-D arrays of equal length and returns plain floats (or per-row arrays for the
Gaussian gaps), so that training loops can call them on a validation batch as well.
"""

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, special, stats

from iqa_cli.gaussians import gaussian_js_moment, gaussian_kl, gaussian_w2

LN2 = math.log(2.0)
MIN_CORRELATION_ROWS = 3  # Pearson/Spearman/Kendall of two points are always +-1
MIN_LOGISTIC_ROWS = 5  # with 4 points the 4-parameter curve can interpolate exactly: PLCC 1 says nothing
RISE_WIDTH = 2.0 * math.log(19.0)  # x |b4|: where the logistic climbs from 5% to 95% of b1 - b2
MIN_STD = 1e-6  # Gaussian gaps need std > 0; zero stds (one-hot probs, constant votes) are raised to this
JS_GRID_POINTS = 128  # trapezoid nodes per expectation; accurate to ~1e-13 (see gaussian_js)
JS_HALF_WIDTH = 10.0  # grids span +-10 standard deviations; the Gaussian mass beyond is 1.5e-23
JS_TAIL = 40.0  # softplus(t) < exp(-40) where t < -40: the window of the wide term ends there
_JS_CHUNK_ROWS = 8192  # rows per vectorized block: bounds memory at 128 x 8192 float64 per array


def _as_float64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _check_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _as_float64(pred), _as_float64(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in length: {pred.shape[0]} vs {target.shape[0]}")
    return pred, target


def plcc(pred: np.ndarray, target: np.ndarray) -> float:
    """Pearson linear correlation; NaN when either side is constant or has fewer than 2 rows."""
    pred, target = _check_pair(pred, target)
    if pred.size < 2:
        return math.nan
    dp, dt = pred - pred.mean(), target - target.mean()
    denom = math.sqrt(float(dp @ dp) * float(dt @ dt))
    if denom == 0.0:
        return math.nan
    return float(np.clip((dp @ dt) / denom, -1.0, 1.0))


def srcc(pred: np.ndarray, target: np.ndarray) -> float:
    """Spearman rank correlation: Pearson on average ranks, so ties count as in scipy."""
    pred, target = _check_pair(pred, target)
    return plcc(stats.rankdata(pred), stats.rankdata(target))


def krcc(pred: np.ndarray, target: np.ndarray) -> float:
    """Kendall rank correlation tau-b (tie-corrected, as pyiqa reports it), O(n log n)."""
    pred, target = _check_pair(pred, target)
    if pred.size < 2 or np.ptp(pred) == 0 or np.ptp(target) == 0:
        return math.nan
    return float(stats.kendalltau(pred, target, variant="b").statistic)


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    """Root mean squared error; only meaningful when both sides are on one scale."""
    pred, target = _check_pair(pred, target)
    if pred.size == 0:
        return math.nan
    return float(np.sqrt(np.mean((pred - target) ** 2)))


def logistic_4params(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """VQEG mapping `f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2`.

    The reference code (DeQA-Score, pyiqa) divides by a signed b4; with |b4| the family of curves is the
    same (a negative b4 equals swapping b1 and b2) but the optimizer cannot step across b4 = 0.
    """
    scale = np.maximum(np.abs(b4), 1e-12)
    return (b1 - b2) * special.expit((np.asarray(x, dtype=np.float64) - b3) / scale) + b2


@dataclass(frozen=True)
class LogisticFit:
    """Result of fitting predictions to human scores with `logistic_4params`.

    `params` is None when the fit failed; `message` says why (or which attempt succeeded).
    """

    params: tuple[float, float, float, float] | None
    message: str

    @property
    def converged(self) -> bool:
        return self.params is not None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.params is None:
            raise ValueError(f"logistic fit did not converge: {self.message}")
        return logistic_4params(x, *self.params)


def logistic_direction(params: tuple[float, float, float, float] | np.ndarray, x: np.ndarray) -> int:
    """+1 where the fitted curve rises over the predictions `x`, -1 where it falls, 0 where it is flat there.

    The sign of f(max x) - f(min x): a logistic is monotone, so this is the sign of its derivative on the data,
    whatever the parametrization (here it is sign(b1 - b2); the reference's signed b4 flips it again).
    """
    x = _as_float64(x)
    ends = logistic_4params(np.array([x.min(), x.max()]), *params)
    return int(np.sign(ends[1] - ends[0]))


def degenerate_fit(params: tuple[float, float, float, float] | np.ndarray, x: np.ndarray, y: np.ndarray) -> str | None:
    """Why a fitted logistic is not a fit of the data (None when it is one).

    Least squares with four free parameters can "fit" data that have no monotone relation, and then PLCC of
    the fitted values is high for a curve that describes nothing. Two shapes are rejected:

    - A step: the slope scale |b4| is so small against the spacing of the predictions that the curve's whole
      climb from 5% to 95% (width 2 ln(19) |b4|) fits inside the gap between the two neighbouring distinct
      predictions across which the fitted values change most. No prediction then sees the curve, only its
      two flat ends (and at most one row on the step, fitted exactly): the fit splits the rows into a low and
      a high group, and its PLCC is that of the best of n - 1 splits, an optimistic number, not a fit. The
      comparison is with the data's own spacing, so it needs no threshold in the units of the scores; two
      clusters of predictions with a smooth curve across the gap between them are not a step.
    - The wrong direction: the curve rises while the predictions rank opposite to the human scores (SRCC < 0),
      or falls while they rank alike. A monotone curve fitted to the data goes the data's way; one going the
      other way follows a few rows, and the summary's note would contradict the curve.

    Fits of data with a monotone trend pass both, so the reference recipe's results on them are kept as they are.
    """
    x, y = _check_pair(x, y)
    xs = np.unique(x)
    steepest = int(np.argmax(np.abs(np.diff(logistic_4params(xs, *params)))))
    gap = xs[steepest + 1] - xs[steepest]
    width = RISE_WIDTH * abs(float(params[3]))
    if width < gap:
        return (
            f"a step between predictions {xs[steepest]:.4g} and {xs[steepest + 1]:.4g} (the curve climbs from 5% "
            f"to 95% over {width:.3g}, within that gap of {gap:.3g}), not a curve through the data"
        )
    direction = logistic_direction(params, x)
    rank = srcc(x, y)
    if np.isfinite(rank) and rank * direction < 0:
        way = "rises" if direction > 0 else "falls"
        return f"the fitted curve {way} while SRCC is {rank:.3f}"
    return None


def _usable_fit(params: np.ndarray, x: np.ndarray) -> bool:
    if not np.all(np.isfinite(params)):
        return False
    yhat = logistic_4params(x, *params)
    return bool(np.all(np.isfinite(yhat)) and np.ptp(yhat) > 0)


def fit_logistic(pred: np.ndarray, target: np.ndarray, maxfev: int = 10000) -> LogisticFit:
    """Fits `logistic_4params` from predictions to human scores by least squares.

    First the reference recipe (DeQA-Score `fit_curve`: p0 = [max y, min y, mean x, std x / 4],
    Levenberg-Marquardt, maxfev 10000) so numbers match the papers; if that fails or is degenerate
    (`degenerate_fit`: a step, or the wrong direction), a bounded trust-region fit on standardized
    predictions started on the side of the correlation's sign; if that is degenerate too, no fit.
    Fewer than `MIN_LOGISTIC_ROWS` distinct predictions are not fitted: the curve could pass through the
    mean human score of every distinct prediction (ties included), so its PLCC would say nothing.
    """
    x, y = _check_pair(pred, target)
    if x.size < MIN_LOGISTIC_ROWS:
        return LogisticFit(None, f"{x.size} rows; the 4-parameter fit needs at least {MIN_LOGISTIC_ROWS}")
    if np.ptp(x) == 0:
        return LogisticFit(None, "predictions are constant")
    if np.ptp(y) == 0:
        return LogisticFit(None, "human scores are constant")
    distinct = np.unique(x).size
    if distinct < MIN_LOGISTIC_ROWS:
        return LogisticFit(
            None, f"{distinct} distinct predictions; the 4-parameter fit needs at least {MIN_LOGISTIC_ROWS}"
        )

    p0 = [y.max(), y.min(), x.mean(), x.std() / 4.0]
    reference = _attempt("reference start", "converged (reference initial values)", x, y,
                         lambda: optimize.curve_fit(logistic_4params, x, y, p0=p0, maxfev=maxfev)[0])  # fmt: skip
    if reference.params is not None:
        return reference
    mean, std = x.mean(), x.std()
    xs = (x - mean) / std
    lo, hi, span = y.min(), y.max(), np.ptp(y)
    top, bottom = (hi, lo) if (xs @ (y - y.mean())) >= 0 else (lo, hi)
    bounds = ([lo - 50 * span, lo - 50 * span, xs.min() - 5, 1e-3], [hi + 50 * span, hi + 50 * span, xs.max() + 5, 1e3])

    def bounded() -> np.ndarray:
        params, _ = optimize.curve_fit(
            logistic_4params, xs, y, p0=[top, bottom, 0.0, 0.5], bounds=bounds, method="trf", maxfev=maxfev
        )
        return np.array([params[0], params[1], mean + std * params[2], std * params[3]])

    fitted = _attempt("bounded fit", "converged (bounded fit on standardized scores)", x, y, bounded)
    if fitted.params is not None:
        return fitted
    return LogisticFit(None, f"{reference.message}; {fitted.message}")


def _attempt(name: str, success: str, x: np.ndarray, y: np.ndarray, fit: Callable[[], np.ndarray]) -> LogisticFit:
    """One try of `fit_logistic`: its parameters when they are usable and not degenerate, else why not."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            params = fit()
    except (RuntimeError, ValueError, FloatingPointError) as exc:
        return LogisticFit(None, f"{name}: {' '.join(str(exc).split())}")
    why = degenerate_fit(params, x, y) if _usable_fit(params, x) else "a non-finite or flat curve"
    if why is None:
        return LogisticFit(tuple(float(p) for p in params), success)
    return LogisticFit(None, f"{name} gave {why}")


def _trapezoid_rows(values: np.ndarray, step: np.ndarray) -> np.ndarray:
    # values [R, G], step [R] -> [R]
    return (values.sum(axis=1) - 0.5 * (values[:, 0] + values[:, -1])) * step


def _js_block(mu_w, std_w, mu_n, std_n, points: int) -> np.ndarray:
    # Work in the wide Gaussian's standard coordinate z = (x - mu_w) / std_w: W = N(0, 1), N = N(m, s^2), s <= 1.
    m, s = (mu_n - mu_w) / std_w, std_n / std_w
    # t(z) = log n(z) - log w(z) = c2 z^2 + c1 z + c0
    c2, c1, c0 = 0.5 * (1.0 - 1.0 / s**2), m / s**2, -0.5 * m**2 / s**2 - np.log(s)
    u = np.linspace(0.0, 1.0, points)

    # A = E_W[softplus(t)]: negligible wherever t < -JS_TAIL, and on |z| <= L that needs n(z) to be within
    # exp(-JS_TAIL - L^2/2) of its peak, i.e. |z - m| < s k. That window keeps the narrow Gaussian resolved.
    k = s * np.sqrt(2.0 * JS_TAIL + JS_HALF_WIDTH**2 + 2.0 * np.log(1.0 / s))
    lo = np.maximum(m - k, -JS_HALF_WIDTH)
    width = np.maximum(np.minimum(m + k, JS_HALF_WIDTH) - lo, 0.0)
    z = lo[:, None] + width[:, None] * u  # R, G
    t = (c2[:, None] * z + c1[:, None]) * z + c0[:, None]
    integrand = np.exp(-0.5 * z * z - 0.5 * math.log(2.0 * math.pi)) * np.logaddexp(0.0, t)
    expect_w = _trapezoid_rows(integrand, width / (points - 1))

    # B = E_N[softplus(-t)] on the narrow Gaussian's own grid v = (z - m) / s.
    v = np.linspace(-JS_HALF_WIDTH, JS_HALF_WIDTH, points)
    weights = np.exp(-0.5 * v * v)
    weights /= weights.sum()
    z = m[:, None] + s[:, None] * v  # R, G
    minus_t = 0.5 * (v * v - z * z) + np.log(s)[:, None]
    expect_n = np.logaddexp(0.0, minus_t) @ weights

    # JS = 1/2 KL(W || M) + 1/2 KL(N || M), KL(W || M) = E_W[log 2 - softplus(t)], likewise for N.
    return np.clip(LN2 - 0.5 * expect_w - 0.5 * expect_n, 0.0, LN2)


def gaussian_js(
    mu_p: np.ndarray, std_p: np.ndarray, mu_q: np.ndarray, std_q: np.ndarray, points: int = JS_GRID_POINTS
) -> np.ndarray:
    """Per-row Jensen-Shannon divergence between two Gaussians, in nats (0 <= JS <= ln 2).

    JS has no closed form for Gaussians, so each row is integrated numerically, vectorized over rows:
    JS = ln 2 - E_W[softplus(t)]/2 - E_N[softplus(-t)]/2 with t = log n - log w, where W is the wider and
    N the narrower Gaussian. Each expectation is a trapezoid rule on a uniform grid in the coordinates of
    the Gaussian it integrates against, the first restricted to the window where N matters; the rule
    converges geometrically for these smooth integrands: 128 nodes agree with adaptive quadrature to
    ~1e-13 for std ratios from 1 to 1e4. DeQA-Score reports a moment-matched approximation instead
    (`gaussian_js_moment`).
    """
    mu_p, std_p, mu_q, std_q = (_as_float64(a) for a in (mu_p, std_p, mu_q, std_q))
    p_wider = std_p >= std_q
    mu_w, std_w = np.where(p_wider, mu_p, mu_q), np.where(p_wider, std_p, std_q)
    mu_n, std_n = np.where(p_wider, mu_q, mu_p), np.where(p_wider, std_q, std_p)
    out = np.empty_like(mu_p)
    with np.errstate(over="ignore", under="ignore"):
        for start in range(0, mu_p.size, _JS_CHUNK_ROWS):
            rows = slice(start, start + _JS_CHUNK_ROWS)
            out[rows] = _js_block(mu_w[rows], std_w[rows], mu_n[rows], std_n[rows], points)
    return out


@dataclass
class Metrics:
    """Agreement of one set of predictions with human scores (NaN where a number is undefined).

    Correlations use `pred` vs `target`; `rmse` compares them as given (so `target` should be on the
    predictions' scale, e.g. mos_norm in [1, 5]); `*_logistic` use the fitted mapping, falling back to the
    raw value with `logistic_converged=False` when the fit fails or is degenerate (`degenerate_fit`).
    Distribution gaps (means over rows) are None when either side has no std.
    """

    n: int
    plcc: float
    plcc_logistic: float
    srcc: float
    krcc: float
    rmse: float
    rmse_logistic: float
    logistic_converged: bool
    logistic_params: tuple[float, float, float, float] | None = None
    kl: float | None = None
    js: float | None = None
    js_moment: float | None = None
    w2: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        def clean(value):
            if isinstance(value, float) and not math.isfinite(value):
                return None
            return value

        out = {key: clean(value) for key, value in self.__dict__.items() if key != "logistic_params"}
        out["logistic_params"] = list(self.logistic_params) if self.logistic_params else None
        return out


def compute_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    pred_std: np.ndarray | None = None,
    target_std: np.ndarray | None = None,
) -> Metrics:
    """All metrics for one group of rows; degenerate input gives NaNs and notes instead of exceptions.

    Rows without a finite prediction or target are dropped; rows without both stds (a dataset published with no
    std, a reasoning answer) still count for the correlations and are left out of KL/JS/W2 alone. Both are counted
    in `notes`.
    """
    pred, target = _check_pair(pred, target)
    keep = np.isfinite(pred) & np.isfinite(target)
    notes = []
    if not keep.all():
        notes.append(f"{int((~keep).sum())} rows with NaN/inf values left out")
    with_std = pred_std is not None and target_std is not None
    if with_std:
        p_std, t_std = _as_float64(pred_std)[keep], _as_float64(target_std)[keep]
    pred, target = pred[keep], target[keep]
    n = int(pred.size)

    nan = math.nan
    if n < MIN_CORRELATION_ROWS:
        notes.append(f"{n} rows: correlations need at least {MIN_CORRELATION_ROWS}")
        corr = (nan, nan, nan)
    elif np.ptp(pred) == 0:
        notes.append("predictions are constant: correlations are undefined")
        corr = (nan, nan, nan)
    elif np.ptp(target) == 0:
        notes.append("human scores are constant: correlations are undefined")
        corr = (nan, nan, nan)
    else:
        corr = (plcc(pred, target), srcc(pred, target), krcc(pred, target))
    raw_rmse = rmse(pred, target)

    fit = fit_logistic(pred, target)
    if fit.converged:
        fitted = fit(pred)
        plcc_log, rmse_log = plcc(fitted, target), rmse(fitted, target)
        if logistic_direction(fit.params, pred) < 0:
            notes.append("the fitted logistic is decreasing: predictions rank opposite to human scores")
    else:
        if np.isfinite(corr[0]):
            notes.append(f"logistic fit failed ({fit.message}): PLCC-logistic/RMSE-logistic report raw values")
        plcc_log, rmse_log = corr[0], raw_rmse

    metrics = Metrics(
        n=n,
        plcc=corr[0],
        plcc_logistic=plcc_log,
        srcc=corr[1],
        krcc=corr[2],
        rmse=raw_rmse,
        rmse_logistic=rmse_log,
        logistic_converged=fit.converged,
        logistic_params=fit.params,
        notes=notes,
    )
    if with_std:
        has_std = np.isfinite(p_std) & np.isfinite(t_std)
        if not has_std.all():
            notes.append(f"{int((~has_std).sum())} rows without a std left out of KL/JS/W2")
        target, pred, p_std, t_std = target[has_std], pred[has_std], p_std[has_std], t_std[has_std]
    if with_std and pred.size > 0:
        clipped = int((p_std < MIN_STD).sum() + (t_std < MIN_STD).sum())
        if clipped:
            notes.append(f"{clipped} std values below {MIN_STD:g} raised to it for KL/JS/W2")
        p_std, t_std = np.maximum(p_std, MIN_STD), np.maximum(t_std, MIN_STD)
        metrics.kl = float(gaussian_kl(target, t_std, pred, p_std).mean())
        metrics.js = float(gaussian_js(target, t_std, pred, p_std).mean())
        metrics.js_moment = float(gaussian_js_moment(target, t_std, pred, p_std).mean())
        metrics.w2 = float(gaussian_w2(target, t_std, pred, p_std).mean())
    return metrics
