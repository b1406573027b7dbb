"""Soft labels, one-hot levels and label statistics against a float64 per-row reimplementation (scipy.stats.norm)."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from iqa_cli import labels
from iqa_cli.errors import UserError

# ---- independent per-row reference: the paper's equations, one row at a time ---------------------------


def row_centers(k):
    return [1.0 + 4.0 * i / (k - 1) for i in range(k)]


def row_raw(mu, s, k, density):
    c = row_centers(k)
    d = 4.0 / (k - 1)
    if density == "cdf":
        return [stats.norm.cdf(ci + d / 2, mu, s) - stats.norm.cdf(ci - d / 2, mu, s) for ci in c]
    return [stats.norm.pdf(ci, loc=mu, scale=s) for ci in c]


def row_interpolation(mu, k):
    c = row_centers(k)
    probs = [0.0] * k
    for i in range(k - 1):
        if c[i] <= mu <= c[i + 1]:
            w = (mu - c[i]) / (c[i + 1] - c[i])
            probs[i], probs[i + 1] = 1.0 - w, w
            return probs
    raise AssertionError(f"mu {mu} outside [1, 5]")


def row_soft_label(mu, s, k, density, std_thr=0.2, mean_thr=0.1):
    """Returns (probs, alpha, beta, fallback, clipped), solving the 2x2 system with numpy.linalg."""
    c = row_centers(k)
    raw = row_raw(mu, s, k, density) if s > 0 else [0.0] * k
    a_sum, b_sum = sum(raw), sum(p * ci for p, ci in zip(raw, c, strict=True))
    try:
        alpha, beta = np.linalg.solve([[a_sum, k], [b_sum, sum(c)]], [1.0, mu])
    except np.linalg.LinAlgError:  # no solution (all mass in one level, or none): the row falls back
        alpha = None
    if alpha is not None:
        adjusted = [alpha * p + beta for p in raw]
        clipped = any(p < -1e-12 for p in adjusted)  # beyond rounding noise
        probs = [max(p, 0.0) for p in adjusted]
        total = sum(probs)
        probs = [p / total for p in probs]
        miss = abs(sum(p * ci for p, ci in zip(probs, c, strict=True)) - mu)
    else:
        clipped, miss = False, math.inf
    if s < std_thr or miss > mean_thr:
        return row_interpolation(mu, k), 1.0, 0.0, True, clipped
    return probs, alpha, beta, False, clipped


def row_level(mos, k, lo, hi):
    eps = 1e-8
    for idx in range(1, k + 1):
        left = lo + (idx - 1) / k * (hi - lo) - eps
        right = lo + idx / k * (hi - lo) + eps
        if left < mos <= right:
            return idx - 1
    raise AssertionError(mos)


def kl_ref(mu1, s1, mu2, s2, eps=1e-8):
    return math.log(s2 / (s1 + eps)) + (s1**2 + (mu1 - mu2) ** 2) / (2 * s2**2 + eps) - 0.5


def js_ref(mu1, s1, mu2, s2):
    mu_m, s_m = (mu1 + mu2) / 2, math.sqrt((s1**2 + s2**2) / 2)
    return 0.5 * kl_ref(mu1, s1, mu_m, s_m) + 0.5 * kl_ref(mu2, s2, mu_m, s_m)


def sample_rows(rng, n):
    """Random (mu, s) plus the edge cases: range ends, centers, tiny/zero std, std around the threshold."""
    mu = rng.uniform(1.0, 5.0, n)
    s = rng.uniform(0.0, 1.2, n)
    edges_mu = [1.0, 5.0, 1.0, 5.0, 2.0, 4.0, 1.37, 4.5, 2.5, 1.02, 4.98, 3.5]
    edges_s = [0.5, 0.5, 0.0, 0.0, 0.0, 0.3, 0.19999, 0.2, 1e-3, 0.9, 0.9, 2.5]
    mu[: len(edges_mu)] = edges_mu
    s[: len(edges_s)] = edges_s
    keep = np.abs(mu - 3.0) > 1e-3  # the 2x2 system is singular at mu = 3; tested separately
    return mu[keep], s[keep]


# ---- levels and names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 5, 12])
def test_level_centers_are_evenly_spaced_over_1_to_5(k):
    np.testing.assert_allclose(labels.level_centers(k), row_centers(k), rtol=0, atol=1e-15)
    assert labels.level_width(k) == pytest.approx(4.0 / (k - 1))


def test_level_names_sets_and_custom_lists():
    assert labels.level_names() == ["bad", "poor", "fair", "good", "excellent"]
    assert labels.level_names(5, "quality") == ["bad", "poor", "fair", "good", "excellent"]
    assert labels.level_names(3) == ["one", "two", "three"]
    assert labels.level_names(12, "numbers")[-1] == "twelve"
    assert labels.level_names(2, "low, high") == ["low", "high"]
    assert labels.level_names(3, ["a", "b", "c"]) == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("k", "names", "needle"),
    [
        (1, None, "from 2 to 12"),
        (13, None, "from 2 to 12"),
        (4, "quality", "does not fit 4 levels"),
        (3, "a,b", "3 levels need 3 level names"),
        (3, "a,a,b", "distinct"),
        (2, "a,", "empty level name"),
    ],
)
def test_level_names_reject_bad_input(k, names, needle):
    with pytest.raises(UserError, match=needle):
        labels.level_names(k, names)


# ---- normalization and one-hot levels -------------------------------------------------------------------


def test_normalization_maps_range_to_1_5_and_flips_lower_is_better():
    mos = np.array([10.0, 55.0, 100.0])
    std = np.array([9.0, 0.0, 4.5])
    lo, hi = labels.score_range(mos)
    mos_n, std_n = labels.normalize_scores(mos, std, lo=lo, hi=hi)
    np.testing.assert_allclose(mos_n, [1.0, 3.0, 5.0])
    np.testing.assert_allclose(std_n, [0.4, 0.0, 0.2])
    flipped, _ = labels.normalize_scores(mos, std, lo=lo, hi=hi, lower_is_better=True)
    np.testing.assert_allclose(flipped, [5.0, 3.0, 1.0])
    with pytest.raises(UserError, match="all 2 MOS values equal 7"):
        labels.score_range(np.array([7.0, 7.0]))


@pytest.mark.parametrize("k", [2, 5, 12])
def test_one_hot_levels_follow_the_q_align_interval_rule(k, seeded):
    rng = np.random.default_rng(seeded)
    lo, hi = 3.91, 88.39
    boundaries = [lo + i / k * (hi - lo) for i in range(k + 1)]
    mos = np.concatenate([rng.uniform(lo, hi, 500), boundaries, [lo, hi]])
    expected = [row_level(m, k, lo, hi) for m in mos]
    np.testing.assert_array_equal(labels.one_hot_levels(mos, k, lo, hi), expected)
    # a MOS exactly on a boundary belongs to the lower level; the range ends to the first and last level
    assert labels.one_hot_levels(np.array([1.8, 1.0, 5.0]), 5).tolist() == [0, 0, 4]


# ---- soft labels -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", ["cdf", "pdf"])
@pytest.mark.parametrize("k", [2, 5, 12])
def test_soft_labels_match_per_row_reimplementation(density, k, seeded):
    mu, s = sample_rows(np.random.default_rng(seeded + k), 300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # s == 0 and underflow must not leak RuntimeWarnings
        out = labels.soft_labels(mu, s, k, density=density)
    expected = [row_soft_label(m, sd, k, density) for m, sd in zip(mu, s, strict=True)]
    np.testing.assert_allclose(out.probs, [e[0] for e in expected], rtol=0, atol=1e-10)
    np.testing.assert_array_equal(out.fallback, [e[3] for e in expected])
    np.testing.assert_allclose(out.alpha, [e[1] for e in expected], rtol=1e-8)
    np.testing.assert_allclose(out.beta, [e[2] for e in expected], rtol=1e-8, atol=1e-12)
    kept = ~out.fallback
    np.testing.assert_array_equal(out.clipped[kept], [e[4] for e, f in zip(expected, kept, strict=True) if f])
    # every path is exercised: fallback and adjusted rows, clipped and unclipped adjusted rows
    assert out.fallback.any() and kept.any()
    if k > 2:
        assert (out.clipped & kept).any() and (~out.clipped & kept).any()


@pytest.mark.parametrize("density", ["cdf", "pdf"])
@pytest.mark.parametrize("k", [2, 5, 12])
def test_soft_labels_sum_to_one_and_keep_the_mean(density, k, seeded):
    rng = np.random.default_rng(seeded)
    mu = np.concatenate([rng.uniform(1, 5, 2000), [1.0, 5.0, 3.0]])
    s = np.concatenate([rng.uniform(0, 1.5, 2000), [0.0, 0.7, 0.0]])
    out = labels.soft_labels(mu, s, k, density=density)
    assert np.isfinite(out.probs).all() and (out.probs >= 0).all()
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    mean, std = labels.recover_moments(out.probs)
    exact = out.fallback | ~out.clipped
    assert exact.sum() > 1000
    np.testing.assert_allclose(mean[exact], mu[exact], rtol=0, atol=1e-6)
    # recovered std is the Eq. 3 std, checked per row
    c = np.array(row_centers(k))
    for i in range(0, mu.size, 97):
        m = float(out.probs[i] @ c)
        assert std[i] == pytest.approx(math.sqrt(float(out.probs[i] @ (c - m) ** 2)), abs=1e-12)


def test_mean_at_the_middle_center_is_not_the_uniform_label():
    s = np.array([0.7, 0.7, 0.7])
    mu = np.array([3.0, 3.0 + 1e-7, 3.0 + 1e-3])
    out = labels.soft_labels(mu, s, 5, density="cdf")
    assert not out.clipped.any() and not out.fallback.any()
    mean, _ = labels.recover_moments(out.probs)
    np.testing.assert_allclose(mean, mu, atol=1e-9)
    np.testing.assert_allclose(out.probs[0], out.probs[0][::-1], atol=1e-12)  # symmetric around 3
    assert not np.allclose(out.probs[0], 0.2)  # the reference's +1e-9 makes this uniform
    np.testing.assert_allclose(out.probs[0], out.probs[1], atol=1e-6)  # continuous through mu = 3
    np.testing.assert_allclose(out.probs[0], out.probs[2], atol=2e-3)


def test_range_edges_and_zero_std_fall_back_to_one_level():
    out = labels.soft_labels(np.array([1.0, 5.0, 2.0]), np.array([0.0, 0.0, 0.0]), 5)
    np.testing.assert_array_equal(out.probs, np.eye(5)[[0, 4, 1]])
    assert out.fallback.all()


def test_two_levels_give_the_interpolation_for_every_row(seeded):
    rng = np.random.default_rng(seeded)
    mu, s = rng.uniform(1, 5, 400), rng.uniform(0.3, 1.0, 400)
    out = labels.soft_labels(mu, s, 2, density="pdf")
    np.testing.assert_allclose(out.probs, labels.interpolation_labels(mu, 2), atol=1e-12)


def test_reference_mode_leaves_clipped_labels_unnormalized(seeded):
    rng = np.random.default_rng(seeded)
    mu, s = rng.uniform(1, 1.6, 300), rng.uniform(0.6, 1.0, 300)
    ref = labels.soft_labels(mu, s, 5, density="pdf", renormalize_clipped=False)
    kept = ref.clipped & ~ref.fallback
    assert kept.any()
    assert (ref.probs[kept].sum(axis=1) > 1 + 1e-9).all()


def test_unknown_density_is_a_user_error():
    with pytest.raises(UserError, match="density must be one of cdf, pdf"):
        labels.soft_labels(np.array([2.0]), np.array([0.5]), density="gauss")


# ---- Tables 1-2 statistics --------------------------------------------------------------------------------


@pytest.mark.parametrize(("density", "k"), [("pdf", 5), ("cdf", 12), ("cdf", 2)])
def test_label_statistics_match_scipy_and_the_reference_formulas(density, k, seeded):
    rng = np.random.default_rng(seeded)
    mu, s = rng.uniform(1, 5, 800), rng.uniform(0.05, 1.0, 800)
    s_known = s.copy()
    s_known[::50] = np.nan  # rows without a std: left out of JS/W only
    out = labels.soft_labels(mu, np.nan_to_num(s_known, nan=0.0), k, density=density)
    level = labels.one_hot_levels(mu, k)
    got = labels.label_statistics(mu, s_known, out, level)

    c = np.array(row_centers(k))
    known = ~np.isnan(s_known)
    soft_mean = np.array([float(p @ c) for p in out.probs])
    soft_std = np.array([math.sqrt(float(p @ (c - m) ** 2)) for p, m in zip(out.probs, soft_mean, strict=True)])
    hot_mean = c[level]
    for kind, mean, std in (("soft", soft_mean, soft_std), ("one_hot", hot_mean, np.zeros_like(mu))):
        row = got[kind]
        assert row["l1"] == pytest.approx(np.mean(np.abs(mean - mu)), rel=1e-9)
        assert row["rmse"] == pytest.approx(math.sqrt(np.mean((mean - mu) ** 2)), rel=1e-9)
        assert row["plcc"] == pytest.approx(stats.pearsonr(mean, mu)[0], rel=1e-9)
        assert row["srcc"] == pytest.approx(stats.spearmanr(np.round(mean, 9), mu)[0], rel=1e-9)
        rows = list(zip(mu[known], s_known[known], mean[known], std[known], strict=True))
        js = [js_ref(a, b, m, sd) for a, b, m, sd in rows]
        w2 = [math.hypot(a - m, b - sd) for a, b, m, sd in rows]
        assert row["js"] == pytest.approx(np.mean(js), rel=1e-6)
        assert row["wasserstein"] == pytest.approx(np.mean(w2), rel=1e-9)
    assert got["rows"] == 800 and got["std_rows"] == int(known.sum())
    assert got["fallback"] == int(out.fallback.sum()) > 0
    assert got["alpha"]["mean"] == pytest.approx(np.mean(out.alpha)) and got["beta"]["std"] == pytest.approx(
        np.std(out.beta)
    )
    assert got["soft"]["l1"] < got["one_hot"]["l1"]


def test_statistics_of_a_single_row_have_no_correlations():
    out = labels.soft_labels(np.array([2.5]), np.array([0.5]))
    got = labels.label_statistics(np.array([2.5]), np.array([0.5]), out, labels.one_hot_levels(np.array([2.5])))
    assert got["soft"]["plcc"] is None and got["soft"]["srcc"] is None
    assert got["soft"]["l1"] == pytest.approx(0.0, abs=1e-9)
