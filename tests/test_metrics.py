"""Metrics against independent computations: scipy, O(n^2) Kendall, closed forms, adaptive quadrature."""

import itertools
import math

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from iqa_cli import metrics


def _kendall_tau_b_pairs(x: np.ndarray, y: np.ndarray) -> float:
    """Textbook tau-b over all pairs, for cross-checking."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif dx == dy:
            concordant += 1
        else:
            discordant += 1
    return (concordant - discordant) / math.sqrt(
        (concordant + discordant + ties_x) * (concordant + discordant + ties_y)
    )


@pytest.mark.parametrize("n", [3, 17, 500])
@pytest.mark.parametrize("with_ties", [False, True])
def test_correlations_and_rmse_match_scipy(seeded, n, with_ties):
    rng = np.random.default_rng(seeded + n)
    x = rng.normal(size=n)
    y = 0.6 * x + rng.normal(size=n)
    if with_ties:
        x, y = np.round(x * 2) / 2, np.round(y)
    assert metrics.plcc(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert metrics.srcc(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert metrics.krcc(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    if n <= 17:
        assert metrics.krcc(x, y) == pytest.approx(_kendall_tau_b_pairs(x, y), abs=1e-12)
    assert metrics.rmse(x, y) == pytest.approx(
        math.sqrt(sum((a - b) ** 2 for a, b in zip(x, y, strict=True)) / n), rel=1e-12
    )


def test_correlations_of_constant_input_are_nan():
    x = np.ones(10)
    y = np.arange(10.0)
    assert math.isnan(metrics.plcc(x, y))
    assert math.isnan(metrics.srcc(x, y))
    assert math.isnan(metrics.krcc(y, x))


def _reference_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The recipe of DeQA-Score/pyiqa `fit_curve`, written out here: signed b4, their p0, LM, maxfev 10000."""

    def curve(x, b1, b2, b3, b4):
        return (b1 - b2) / (1 + np.exp(-(x - b3) / b4)) + b2

    p0 = [np.max(y), np.min(y), np.mean(x), np.std(x) / 4.0]
    params, _ = optimize.curve_fit(curve, x, y, p0=p0, maxfev=10000)
    return curve(x, *params)


def test_logistic_plcc_at_least_raw_on_monotone_nonlinear_data(seeded):
    rng = np.random.default_rng(seeded)
    x = rng.uniform(-2, 2, size=400)
    y = np.exp(x) + rng.normal(scale=0.3, size=400)
    m = metrics.compute_metrics(x, y)
    assert m.logistic_converged
    assert m.plcc_logistic >= m.plcc + 0.02
    assert m.rmse_logistic < m.rmse
    # same numbers as the reference recipe, and PLCC-logistic is PLCC of the fitted values
    expected = _reference_fit(x, y)
    np.testing.assert_allclose(metrics.logistic_4params(x, *m.logistic_params), expected, atol=1e-5)
    assert m.plcc_logistic == pytest.approx(stats.pearsonr(expected, y).statistic, abs=1e-7)


def test_logistic_fit_is_decreasing_for_anticorrelated_scores(seeded):
    rng = np.random.default_rng(seeded)
    x = rng.uniform(-2, 2, size=200)
    y = -np.tanh(x) + rng.normal(scale=0.1, size=200)
    m = metrics.compute_metrics(x, y)
    assert m.srcc < 0 and m.plcc < 0
    assert m.plcc_logistic > 0.9  # as in the reference code, the fit absorbs the direction
    assert any("opposite" in note for note in m.notes)


def test_logistic_fit_falls_back_when_reference_start_fails(seeded):
    rng = np.random.default_rng(seeded)
    z = rng.normal(size=300)
    x = 1e6 + 1e-3 * z  # predictions on a far offset: the reference start stalls
    y = np.exp(z) + rng.normal(scale=0.2, size=300)
    fit = metrics.fit_logistic(x, y)
    assert fit.converged and "bounded" in fit.message
    assert metrics.plcc(fit(x), y) > metrics.plcc(x, y) + 0.05


@pytest.mark.parametrize(
    ("x", "why"),
    [(np.ones(20), "constant"), (np.arange(4.0), "at least 5")],
)
def test_logistic_fit_failure_is_reported_not_raised(x, why):
    y = np.linspace(1, 5, x.size) ** 2
    fit = metrics.fit_logistic(x, y)
    assert not fit.converged and why in fit.message
    with pytest.raises(ValueError, match="did not converge"):
        fit(x)
    m = metrics.compute_metrics(x, y)
    assert not m.logistic_converged
    assert m.plcc_logistic == m.plcc or (math.isnan(m.plcc_logistic) and math.isnan(m.plcc))
    assert m.rmse_logistic == m.rmse
    assert m.notes


def test_compute_metrics_degenerate_inputs_give_notes_not_errors():
    m = metrics.compute_metrics(np.array([1.0, 2.0]), np.array([2.0, 1.0]))
    assert m.n == 2 and math.isnan(m.plcc) and "at least 3" in m.notes[0]
    m = metrics.compute_metrics(np.array([1.0, np.nan, 3.0, 4.0, 2.0, 5.0]), np.array([1.0, 2.0, 3.0, np.nan, 2.5, 4]))
    assert m.n == 4 and "2 rows with NaN" in m.notes[0]
    assert m.plcc == pytest.approx(stats.pearsonr([1.0, 3.0, 2.0, 5.0], [1.0, 3.0, 2.5, 4.0]).statistic)
    m = metrics.compute_metrics(np.full(8, 3.0), np.arange(8.0))
    assert math.isnan(m.srcc) and "constant" in m.notes[0]
    assert math.isfinite(m.rmse)
    assert m.to_dict()["srcc"] is None  # NaN becomes null in JSON


def _random_gaussian_pairs(rng, n):
    return rng.uniform(1, 5, n), rng.uniform(0.05, 1.2, n), rng.uniform(1, 5, n), rng.uniform(0.05, 1.2, n)


def test_kl_matches_closed_form_and_quadrature(seeded):
    mu_p, s_p, mu_q, s_q = _random_gaussian_pairs(np.random.default_rng(seeded), 50)
    kl = metrics.gaussian_kl(mu_p, s_p, mu_q, s_q)
    # closed form written as log-variance ratio and the trace/mean terms
    expected = 0.5 * (np.log(s_q**2 / s_p**2) + s_p**2 / s_q**2 + (mu_q - mu_p) ** 2 / s_q**2 - 1)
    np.testing.assert_allclose(kl, expected, rtol=1e-12)
    for i in range(3):
        p, q = stats.norm(mu_p[i], s_p[i]), stats.norm(mu_q[i], s_q[i])
        lo, hi = mu_p[i] - 12 * s_p[i], mu_p[i] + 12 * s_p[i]
        value = integrate.quad(lambda x, p=p, q=q: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi, limit=200)[0]
        assert kl[i] == pytest.approx(value, rel=1e-7)


def test_w2_matches_quantile_integral(seeded):
    mu_p, s_p, mu_q, s_q = _random_gaussian_pairs(np.random.default_rng(seeded), 20)
    w2 = metrics.gaussian_w2(mu_p, s_p, mu_q, s_q)
    np.testing.assert_allclose(w2, np.hypot(mu_p - mu_q, s_p - s_q), rtol=1e-12)
    for i in range(3):  # W2^2 = int_0^1 (F^-1(u) - G^-1(u))^2 du
        gap = integrate.quad(
            lambda u, i=i: (stats.norm.ppf(u, mu_p[i], s_p[i]) - stats.norm.ppf(u, mu_q[i], s_q[i])) ** 2, 0, 1
        )[0]
        assert w2[i] == pytest.approx(math.sqrt(gap), rel=1e-6)


def _js_quadrature(m1: float, s1: float, m2: float, s2: float) -> float:
    """JS by adaptive quadrature, split at several std marks of both Gaussians so narrow peaks are seen."""
    p, q = stats.norm(m1, s1), stats.norm(m2, s2)

    def integrand(x):
        lp, lq = p.logpdf(x), q.logpdf(x)
        lm = np.logaddexp(lp, lq) - math.log(2)
        return 0.5 * np.exp(lp) * (lp - lm) + 0.5 * np.exp(lq) * (lq - lm)

    marks = {m + k * s for m, s in ((m1, s1), (m2, s2)) for k in (-14, -6, -3, -1, 0, 1, 3, 6, 14)}
    edges = sorted(marks)
    return sum(
        integrate.quad(integrand, a, b, limit=200, epsabs=1e-14, epsrel=1e-12)[0] for a, b in itertools.pairwise(edges)
    )


JS_PAIRS = [
    (3.0, 0.5, 3.2, 0.7),
    (1.0, 0.2, 5.0, 0.9),
    (2.5, 1.0, 2.5, 0.05),
    (3.0, 0.3, 3.5, 0.01),
    (3.0, 1e-3, 3.0, 1.0),
    (3.0, 1e-4, 3.001, 1.0),
    (2.0, 0.01, 2.05, 0.011),
    (1.2, 0.02, 4.8, 1.4),
]


def test_js_matches_quadrature_on_pairs():
    cols = [np.array(c) for c in zip(*JS_PAIRS, strict=True)]
    js = metrics.gaussian_js(*cols)
    expected = [_js_quadrature(*pair) for pair in JS_PAIRS]
    np.testing.assert_allclose(js, expected, atol=1e-9)


def test_js_properties(seeded):
    mu_p, s_p, mu_q, s_q = _random_gaussian_pairs(np.random.default_rng(seeded), 20000)  # spans several row blocks
    js = metrics.gaussian_js(mu_p, s_p, mu_q, s_q)
    np.testing.assert_allclose(js, metrics.gaussian_js(mu_q, s_q, mu_p, s_p), atol=1e-12)
    assert np.all(js >= 0) and np.all(js <= math.log(2))
    np.testing.assert_allclose(metrics.gaussian_js(mu_p, s_p, mu_p, s_p), 0.0, atol=1e-12)
    far = metrics.gaussian_js(np.array([1.0]), np.array([0.01]), np.array([5.0]), np.array([0.01]))
    assert far[0] == pytest.approx(math.log(2), abs=1e-12)
    # KL(P || M) <= KL(P || Q) / 2 by convexity, so JS <= (KL(P || Q) + KL(Q || P)) / 4; rows do not depend on blocks
    bound = 0.25 * (metrics.gaussian_kl(mu_p, s_p, mu_q, s_q) + metrics.gaussian_kl(mu_q, s_q, mu_p, s_p))
    assert np.all(js <= bound + 1e-12)
    np.testing.assert_allclose(metrics.gaussian_js(mu_p[-5:], s_p[-5:], mu_q[-5:], s_q[-5:]), js[-5:], atol=1e-15)


def test_js_moment_is_deqa_formula(seeded):
    mu_p, s_p, mu_q, s_q = _random_gaussian_pairs(np.random.default_rng(seeded), 100)

    def deqa_kl(mu_1, mu_2, sigma_1, sigma_2):  # cal_distribution_gap.py, eps included
        eps = 1e-8
        return np.log(sigma_2 / (sigma_1 + eps)) + (sigma_1**2 + (mu_1 - mu_2) ** 2) / (2 * sigma_2**2 + eps) - 0.5

    mu_m, s_m = 0.5 * (mu_p + mu_q), np.sqrt(0.5 * (s_p**2 + s_q**2))
    expected = 0.5 * deqa_kl(mu_p, mu_m, s_p, s_m) + 0.5 * deqa_kl(mu_q, mu_m, s_q, s_m)
    np.testing.assert_allclose(metrics.gaussian_js_moment(mu_p, s_p, mu_q, s_q), expected, rtol=1e-5, atol=1e-7)


def test_compute_metrics_distribution_gaps_are_row_means_of_human_vs_predicted(seeded):
    mu_h, s_h, mu_pred, s_pred = _random_gaussian_pairs(np.random.default_rng(seeded), 300)
    s_pred[0] = 0.0  # a one-hot prediction: clipped, not a division by zero
    m = metrics.compute_metrics(mu_pred, mu_h, s_pred, s_h)
    s_used = np.maximum(s_pred, metrics.MIN_STD)
    kl_rows = np.log(s_used / s_h) + (s_h**2 + (mu_h - mu_pred) ** 2) / (2 * s_used**2) - 0.5  # KL(human || pred)
    assert m.kl == pytest.approx(kl_rows.mean(), rel=1e-10)
    assert m.w2 == pytest.approx(np.hypot(mu_h - mu_pred, s_h - s_used).mean(), rel=1e-12)
    assert m.js == pytest.approx(metrics.gaussian_js(mu_h, s_h, mu_pred, s_used).mean(), rel=1e-12)
    assert m.js_moment == pytest.approx(metrics.gaussian_js_moment(mu_h, s_h, mu_pred, s_used).mean(), rel=1e-12)
    assert any("raised" in note for note in m.notes)
    assert metrics.compute_metrics(mu_pred, mu_h).kl is None


def test_rows_without_a_std_keep_their_correlations_and_leave_only_the_distribution_gaps(seeded):
    """A dataset published without stds (std_norm NaN) or a reasoning answer (std NaN) still ranks: only KL/JS/W2
    need both stds, and they are the row means over the rows that have them."""
    rng = np.random.default_rng(seeded)
    mu_h, s_h, mu_pred, s_pred = _random_gaussian_pairs(rng, 200)
    s_h[::4], s_pred[1::5] = np.nan, np.nan
    m = metrics.compute_metrics(mu_pred, mu_h, s_pred, s_h)
    assert m.n == 200
    assert m.srcc == pytest.approx(stats.spearmanr(mu_pred, mu_h).statistic, rel=1e-12)
    assert m.plcc == pytest.approx(stats.pearsonr(mu_pred, mu_h).statistic, rel=1e-12)
    has = np.isfinite(s_h) & np.isfinite(s_pred)
    s_used = np.maximum(s_pred[has], metrics.MIN_STD)
    kl_rows = np.log(s_used / s_h[has]) + (s_h[has] ** 2 + (mu_h[has] - mu_pred[has]) ** 2) / (2 * s_used**2) - 0.5
    assert m.kl == pytest.approx(kl_rows.mean(), rel=1e-10)
    assert f"{int((~has).sum())} rows without a std left out of KL/JS/W2" in m.notes
    nothing = metrics.compute_metrics(mu_pred, mu_h, s_pred, np.full(200, np.nan))
    assert nothing.n == 200 and nothing.kl is None and np.isfinite(nothing.srcc)


# --- degenerate logistic fits ---------------------------------------------------------------------------------------

# Six predictions without a monotone relation to the human scores (SRCC -0.03): the reference recipe's
# Levenberg-Marquardt fit ends in a step (|b4| ~ 1e-4) between the two largest predictions that isolates the
# highest human score, so PLCC of its fitted values is 0.66 against a raw PLCC of -0.10.
STEP_X = np.array([3.347, 2.636, 3.422, 2.921, 3.015, 3.579])
STEP_Y = np.array([1.37, 3.32, 1.79, 4.23, 2.96, 4.95])


@pytest.mark.filterwarnings("ignore")  # the reference recipe overflows on its way to the step
def test_a_step_fit_is_not_converged_and_the_summary_falls_back_to_raw_plcc():
    reference = _reference_fit(STEP_X, STEP_Y)  # what the papers' code reports for these rows
    raw = stats.pearsonr(STEP_X, STEP_Y).statistic
    assert stats.pearsonr(reference, STEP_Y).statistic > raw + 0.5  # the inflation this guards against
    assert len(np.unique(np.round(reference, 6))) <= 3  # a step: the fitted values take two levels (+ one)

    fit = metrics.fit_logistic(STEP_X, STEP_Y)
    assert not fit.converged and "a step between predictions 3.422 and 3.579" in fit.message
    m = metrics.compute_metrics(STEP_X, STEP_Y)
    assert not m.logistic_converged and m.logistic_params is None
    assert m.plcc_logistic == pytest.approx(raw, abs=1e-12)
    assert m.rmse_logistic == pytest.approx(np.sqrt(np.mean((STEP_X - STEP_Y) ** 2)), abs=1e-12)
    assert m.srcc == pytest.approx(stats.spearmanr(STEP_X, STEP_Y).statistic)
    assert any("logistic fit failed" in note and "raw values" in note for note in m.notes)
    assert not any("decreasing" in note for note in m.notes)  # no claim about a curve that is not reported
    assert m.to_dict()["logistic_converged"] is False


@pytest.mark.parametrize("n", [4, 5, 6])
def test_noise_never_reports_a_step_or_a_curve_against_the_ranks(n):
    """Adversarial small samples (no relation at all): whatever is reported as converged is a curve that goes the
    way the ranks go and whose rise spans more than the gap it is in; PLCC-log is then PLCC of its fitted values."""
    rng = np.random.default_rng(n)
    for _ in range(60):
        x, y = np.round(rng.uniform(2, 4, n), 3), np.round(rng.uniform(1, 5, n), 2)
        m = metrics.compute_metrics(x, y)
        if not m.logistic_converged:
            assert m.plcc_logistic == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
            continue
        assert n >= metrics.MIN_LOGISTIC_ROWS
        fitted = metrics.logistic_4params(x, *m.logistic_params)
        assert m.plcc_logistic == pytest.approx(stats.pearsonr(fitted, y).statistic, abs=1e-9)
        order = np.argsort(x)
        rises = np.diff(fitted[order])
        direction = np.sign(fitted[order][-1] - fitted[order][0])
        assert direction * stats.spearmanr(x, y).statistic >= 0
        steepest = int(np.argmax(np.abs(rises)))
        gap = x[order][steepest + 1] - x[order][steepest]
        assert 2 * math.log(19) * abs(m.logistic_params[3]) >= gap


def test_ties_leaving_four_distinct_predictions_are_not_fitted():
    x = np.array([2.0, 2.0, 3.0, 3.0, 4.0, 5.0, 5.0])
    y = np.array([1.0, 1.4, 2.0, 2.6, 3.9, 4.2, 4.6])
    fit = metrics.fit_logistic(x, y)
    assert not fit.converged and "4 distinct predictions" in fit.message and "at least 5" in fit.message
    m = metrics.compute_metrics(x, y)
    assert m.plcc_logistic == pytest.approx(stats.pearsonr(x, y).statistic)


def test_constant_predictions_are_not_fitted():
    m = metrics.compute_metrics(np.full(6, 3.0), np.array([1.0, 2, 3, 4, 5, 2]))
    assert not m.logistic_converged and math.isnan(m.plcc) and math.isnan(m.plcc_logistic)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_small_monotone_data_keep_the_reference_fit_and_the_note_follows_the_curve(sign):
    x = np.array([1.0, 1.6, 2.1, 2.9, 3.4, 4.2])
    y = 3.0 + sign * np.tanh(x - 2.6) + np.array([0.05, -0.04, 0.03, -0.02, 0.04, -0.05])
    m = metrics.compute_metrics(x, y)
    assert m.logistic_converged
    reference = _reference_fit(x, y)
    np.testing.assert_allclose(metrics.logistic_4params(x, *m.logistic_params), reference, atol=1e-5)
    assert m.plcc_logistic == pytest.approx(stats.pearsonr(reference, y).statistic, abs=1e-7)
    decreasing = [note for note in m.notes if "decreasing" in note]
    assert bool(decreasing) == (sign < 0)
    assert metrics.logistic_direction(m.logistic_params, x) == int(sign)


def test_logistic_direction_is_the_sign_of_the_derivative_whatever_the_sign_of_b4(seeded):
    rng = np.random.default_rng(seeded)
    x = np.linspace(1.0, 5.0, 41)
    for _ in range(50):
        params = (rng.uniform(0, 5), rng.uniform(0, 5), rng.uniform(1, 5), rng.choice([-1, 1]) * rng.uniform(0.3, 2))
        slope = np.gradient(metrics.logistic_4params(x, *params), x)  # finite differences of the fitted function
        assert metrics.logistic_direction(params, x) == int(np.sign(slope.sum()))
        assert np.all(np.sign(slope[np.abs(slope) > 1e-12]) == np.sign(slope.sum()))  # monotone


def test_a_curve_against_the_ranks_is_degenerate_and_a_matching_one_is_not():
    x = np.arange(1.0, 7.0)
    y = np.array([4.8, 4.1, 3.9, 2.5, 2.2, 1.1])  # SRCC -1
    rising, falling = (5.0, 1.0, 3.5, 1.0), (1.0, 5.0, 3.5, 1.0)  # b1 - b2 decides the direction (|b4| is used)
    assert "rises while SRCC is -1.000" in metrics.degenerate_fit(rising, x, y)
    assert metrics.degenerate_fit(falling, x, y) is None
    assert "a step between predictions 3 and 4" in metrics.degenerate_fit((1.0, 5.0, 3.5, 0.01), x, y)
