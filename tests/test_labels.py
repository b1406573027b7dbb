"""Soft labels, one-hot levels and label statistics against float64 per-row reimplementations (scipy.stats.norm).

Two re-derivations, written here: `gen_soft_label_loop` follows DeQA-Score's `build_soft_labels/
gen_soft_label.py` step by step (the default `--label-rule reference` must equal it bit for bit), and
`row_soft_label` solves the paper's equations with numpy.linalg (`--label-rule renormalized`).
"""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
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
    """The renormalized rule: (probs, alpha, beta, fallback, clipped), the 2x2 system solved with numpy.linalg."""
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


# ---- gen_soft_label.py, one row at a time, as the reference writes it (K = 5; other K by the same formulas) --


def gen_level(mos, min_mos, max_mos, k=5):
    """get_level: the first interval of [min, max] cut into K parts, widened by 1e-8, that holds the MOS."""
    eps = 1e-8
    for idx in range(1, k + 1):
        mos_left = min_mos + (idx - 1) / k * (max_mos - min_mos) - eps
        mos_right = min_mos + idx / k * (max_mos - min_mos) + eps
        if mos > mos_left and mos <= mos_right:
            return idx - 1
    raise AssertionError(mos)


def gen_binary_probs(mos, k=5):
    """get_binary_probs on [1, 5]: interpolation over intervals widened by 1e-8; list in ascending quality."""
    eps = 1e-8
    probs = [0] * k
    for idx in range(1, k):
        mos_left = 1.0 + (idx - 1) / (k - 1) * (5.0 - 1.0) - eps
        mos_right = 1.0 + idx / (k - 1) * (5.0 - 1.0) + eps
        if mos > mos_left and mos <= mos_right:
            probs[idx - 1] = (mos_right - mos) / (mos_right - mos_left)
            probs[idx] = (mos - mos_left) / (mos_right - mos_left)
            break
    assert sum(p == 0 for p in probs) == k - 2
    return probs


def gen_row(mos_norm, std_norm, density, k=5, thre_std=0.2, thre_diff=0.1):
    """One pass of the reference's loop body. Lists run from the highest level down, as the reference's.

    Returns label (ascending quality), raw (ascending), raw_diff, diff, mos_rec, alpha, beta, binary, clipped.
    """
    values = np.array([1.0 + 4.0 * i / (k - 1) for i in range(k)][::-1])  # [5, 4, 3, 2, 1] for K = 5
    half = 2.0 / (k - 1)
    probs = []
    for x in values:
        with np.errstate(divide="ignore", invalid="ignore"):  # std 0 (no std): scipy's NaN, quietly
            if density == "cdf":
                prob = stats.norm.cdf(x + half, mos_norm, std_norm) - stats.norm.cdf(x - half, mos_norm, std_norm)
            else:
                prob = stats.norm.pdf(x, loc=mos_norm, scale=std_norm)
        probs.append(prob)
    mos_rec = np.inner(np.array(probs), values)
    raw_diff = abs(mos_rec - mos_norm)
    a_sum = np.array(probs).sum()
    b_sum = np.inner(np.array(probs), values)
    alpha = (mos_norm - 3) / (b_sum - 3.0 * a_sum + 1e-9)
    beta = (1.0 - alpha * a_sum) / k
    adjusted = [p * alpha + beta for p in probs]
    clipped = any(p < -1e-12 for p in adjusted)
    probs_norm = [max(p, 0) for p in adjusted]
    mos_rec = np.inner(np.array(probs_norm), values)
    diff = abs(mos_rec - mos_norm)
    binary = bool(std_norm < thre_std or diff > thre_diff)
    if binary:
        probs_norm = gen_binary_probs(mos_norm, k)[::-1]
        mos_rec = np.inner(np.array(probs_norm), values)
        diff, alpha, beta = abs(mos_rec - mos_norm), 1.0, 0.0
    label = [float(p) for p in probs_norm[::-1]]
    return label, [float(p) for p in probs[::-1]], raw_diff, diff, mos_rec, alpha, beta, binary, clipped


def gen_soft_label_loop(moses, stds, density, k=5):
    """gen_soft_label.py's main() over every row (all in the split): labels and the statistics it prints."""
    max_mos, min_mos = max(float(m) for m in moses), min(float(m) for m in moses)
    rows, levels, preds, gts, raw_diffs, diffs, alphas, betas = [], [], [], [], [], [], [], []
    num_binary, num_clipped = 0, 0
    for mos_str, std_str in zip(moses, stds, strict=True):
        mos, std = float(mos_str), float(std_str)
        levels.append(gen_level(mos, min_mos, max_mos, k))
        mos_norm = 4 * (mos - min_mos) / (max_mos - min_mos) + 1
        std_norm = 4 * std / (max_mos - min_mos)
        label, raw, raw_diff, diff, mos_rec, alpha, beta, binary, clipped = gen_row(mos_norm, std_norm, density, k)
        num_binary += binary
        num_clipped += clipped and not binary
        rows.append((mos_norm, std_norm, label, raw, binary))
        preds.append(mos_rec)
        gts.append(mos_norm)
        raw_diffs.append(raw_diff)
        diffs.append(diff)
        alphas.append(alpha)
        betas.append(beta)
    printed = {
        "srcc": stats.spearmanr(preds, gts)[0],
        "plcc": stats.pearsonr(preds, gts)[0],
        "raw_diff_l1": sum(raw_diffs) / len(raw_diffs),
        "raw_diff_l2": np.sqrt((np.array(raw_diffs) ** 2).mean()),
        "diff_l1": sum(diffs) / len(diffs),
        "diff_l2": np.sqrt((np.array(diffs) ** 2).mean()),
        "alpha_mean": np.mean(alphas),
        "alpha_std": np.std(alphas),
        "beta_mean": np.mean(betas),
        "beta_std": np.std(betas),
        "binary": num_binary,
        "all": len(rows),
        "clipped": num_clipped,
    }
    return rows, levels, printed


def printed_statistics(summary_labels):
    """iqa's statistics under the reference's printed names (the mapping documented in labels.py)."""
    got = summary_labels
    return {
        "srcc": got["soft"]["srcc"],
        "plcc": got["soft"]["plcc"],
        "raw_diff_l1": got["raw"]["l1"],
        "raw_diff_l2": got["raw"]["rmse"],
        "diff_l1": got["soft"]["l1"],
        "diff_l2": got["soft"]["rmse"],
        "alpha_mean": got["alpha"]["mean"],
        "alpha_std": got["alpha"]["std"],
        "beta_mean": got["beta"]["mean"],
        "beta_std": got["beta"]["std"],
        "binary": got["fallback"],
        "all": got["rows"],
        "clipped": got["clipped"],
    }


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
def test_renormalized_soft_labels_match_per_row_reimplementation(density, k, seeded):
    mu, s = sample_rows(np.random.default_rng(seeded + k), 300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # s == 0 and underflow must not leak RuntimeWarnings
        out = labels.soft_labels(mu, s, k, density=density, rule="renormalized")
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
def test_renormalized_soft_labels_sum_to_one_and_keep_the_mean(density, k, seeded):
    rng = np.random.default_rng(seeded)
    mu = np.concatenate([rng.uniform(1, 5, 2000), [1.0, 5.0, 3.0]])
    s = np.concatenate([rng.uniform(0, 1.5, 2000), [0.0, 0.7, 0.0]])
    out = labels.soft_labels(mu, s, k, density=density, rule="renormalized")
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


def test_renormalized_mean_at_the_middle_center_is_not_the_uniform_label():
    s = np.array([0.7, 0.7, 0.7])
    mu = np.array([3.0, 3.0 + 1e-7, 3.0 + 1e-3])
    out = labels.soft_labels(mu, s, 5, density="cdf", rule="renormalized")
    assert not out.clipped.any() and not out.fallback.any()
    mean, _ = labels.recover_moments(out.probs)
    np.testing.assert_allclose(mean, mu, atol=1e-9)
    np.testing.assert_allclose(out.probs[0], out.probs[0][::-1], atol=1e-12)  # symmetric around 3
    assert not np.allclose(out.probs[0], 0.2)  # the reference's +1e-9 makes this uniform
    np.testing.assert_allclose(out.probs[0], out.probs[1], atol=1e-6)  # continuous through mu = 3
    np.testing.assert_allclose(out.probs[0], out.probs[2], atol=2e-3)


def test_range_edges_and_zero_std_fall_back_to_one_level():
    for rule, atol in (("renormalized", 0.0), ("reference", 2e-8)):  # the reference widens by 1e-8
        out = labels.soft_labels(np.array([1.0, 5.0, 2.0]), np.array([0.0, 0.0, 0.0]), 5, rule=rule)
        np.testing.assert_allclose(out.probs, np.eye(5)[[0, 4, 1]], rtol=0, atol=atol)
        assert out.fallback.all()


def test_two_levels_give_the_interpolation_for_every_row(seeded):
    rng = np.random.default_rng(seeded)
    mu, s = rng.uniform(1, 5, 400), rng.uniform(0.3, 1.0, 400)
    out = labels.soft_labels(mu, s, 2, density="pdf", rule="renormalized")
    np.testing.assert_allclose(out.probs, labels.interpolation_labels(mu, 2), atol=1e-12)


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
    out = labels.soft_labels(mu, np.nan_to_num(s_known, nan=0.0), k, density=density, rule="renormalized")
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
        assert row["srcc"] == pytest.approx(stats.spearmanr(mean, mu)[0], rel=1e-9)
        rows = list(zip(mu[known], s_known[known], mean[known], std[known], strict=True))
        js = [js_ref(a, b, m, sd) for a, b, m, sd in rows]
        w2 = [math.hypot(a - m, b - sd) for a, b, m, sd in rows]
        assert row["js"] == pytest.approx(np.mean(js), rel=1e-6)
        assert row["wasserstein"] == pytest.approx(np.mean(w2), rel=1e-9)
    raw_mean = out.raw @ c  # not divided by the raw sum, as gen_soft_label.py's [raw_diff]
    raw_ok = known & (s_known > 0)
    assert got["raw"]["l1"] == pytest.approx(np.mean(np.abs(raw_mean[raw_ok] - mu[raw_ok])), rel=1e-9)
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
    assert got["soft"]["l1"] == pytest.approx(0.0, abs=1e-8)  # the reference's +1e-9 in alpha: a 1e-9 miss


# ---- the reference rule: gen_soft_label.py bit for bit -----------------------------------------------------


def dataset_like(kind, rng, n=300):
    """(file columns, mos, std) in KonIQ's (MOS 1..5, SD), KADID's (dmos 1..5, var) or SPAQ's (MOS 0..100, std)
    layout, with the rows that take every branch: ends of the range (clipping, mean-miss fallback), a MOS
    normalizing to exactly 3, stds below the 0.2 threshold, tied MOS with different stds."""
    if kind == "spaq":
        lo, hi, spread = 0.0, 100.0, (1.0, 30.0)
    else:
        lo, hi, spread = 1.0, 5.0, (0.02, 1.2)
    scale = (hi - lo) / 4
    mos = rng.uniform(lo, hi, n).round(2 if kind != "koniq" else 4)
    std = rng.uniform(*spread, n).round(4)
    edges = [(lo, 1.0), (hi, 1.0), (lo, 0.6), (hi, 0.3), (lo + 2 * scale, 0.7), (lo + 2 * scale, 0.05)]
    edges += [(lo + 0.1 * scale, 0.5), (hi - 0.2 * scale, 0.9), (lo + 1.3 * scale, 0.19), (lo + 1.3 * scale, 0.8)]
    for i, (m, sd) in enumerate(edges):
        mos[i], std[i] = m, round(sd * scale, 4)
    names = [f"{10000 + i}.jpg" for i in range(n)]
    if kind == "koniq":
        return pd.DataFrame({"image_name": names, "MOS": mos, "SD": std}), mos, std
    if kind == "kadid":
        var = (std**2).round(6)
        refs = [f"I{i % 20:02d}.png" for i in range(n)]
        return pd.DataFrame({"dist_img": names, "ref_img": refs, "dmos": mos, "var": var}), mos, np.sqrt(var)
    return pd.DataFrame({"Image name": names, "MOS": mos, "std": std}), mos, std


FILE_NAMES = {"koniq": "koniq10k_scores_and_distributions.csv", "kadid": "dmos.csv", "spaq": "spaq.csv"}


def assert_printed_equal(got, want):
    for key, value in want.items():
        if isinstance(value, int):
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(float(value), rel=1e-12, abs=1e-15), key


@pytest.mark.parametrize("density", ["pdf", "cdf"])
@pytest.mark.parametrize("kind", ["koniq", "kadid", "spaq"])
def test_reference_rule_equals_gen_soft_label_bit_for_bit(kind, density, iqa, tmp_path, seeded):
    rng = np.random.default_rng(seeded + len(kind))
    table, mos, std = dataset_like(kind, rng)
    rows, levels, printed = gen_soft_label_loop([repr(float(m)) for m in mos], [repr(float(s)) for s in std], density)
    want = np.array([r[2] for r in rows])
    binary = np.array([r[4] for r in rows])
    mu_ref = np.array([r[0] for r in rows])
    s_ref = np.array([r[1] for r in rows])
    # every branch of the reference is taken
    assert (binary & (s_ref < 0.2)).any() and (binary & (s_ref >= 0.2)).any() and (~binary).any()
    assert printed["clipped"] > 0
    at_three = (mu_ref == 3.0) & ~binary
    assert at_three.any() and np.array_equal(want[at_three], np.full((at_three.sum(), 5), 0.2))

    # the library, float64
    lo, hi = float(mos.min()), float(mos.max())
    mu, s = labels.normalize_scores(mos, std, lo=lo, hi=hi)
    assert np.array_equal(mu, mu_ref) and np.array_equal(s, s_ref)
    out = labels.soft_labels(mu, s, 5, density=density)
    np.testing.assert_allclose(out.probs, want, rtol=0, atol=1e-12)
    assert np.array_equal(out.fallback, binary)
    np.testing.assert_allclose(out.raw, [r[3] for r in rows], rtol=0, atol=1e-12)
    level = labels.one_hot_levels(mos, 5, lo, hi)
    assert level.tolist() == levels
    assert_printed_equal(printed_statistics(labels.label_statistics(mu, s, out, level)), printed)

    # the command: stored labels are the reference's rounded to float32, the printed statistics its values
    source = tmp_path / FILE_NAMES[kind]
    table.to_csv(source, index=False)
    code, stdout, err = iqa(
        "prepare", kind, "--csv", source, "--out", tmp_path / "o.parquet", "--density", density, "--json"
    )
    assert code == 0, err
    summary = json.loads(stdout)
    frame = pq.read_table(tmp_path / "o.parquet").to_pandas()
    assert np.array_equal(np.stack(frame["soft_label"].to_numpy()), want.astype(np.float32))
    assert frame["fallback"].tolist() == binary.tolist() and frame["level"].tolist() == levels
    assert np.array_equal(frame["mos_norm"], mu_ref) and np.array_equal(frame["std_norm"], s_ref)
    assert summary["label_rule"] == "reference"
    assert_printed_equal(printed_statistics(summary["labels"]), printed)
    # and the human-readable lines under the reference's names
    code, stdout, err = iqa("prepare", kind, "--csv", source, "--out", tmp_path / "o.parquet", "--density", density)
    assert code == 0, err
    assert f"srcc: {printed['srcc']:.6f} plcc: {printed['plcc']:.6f}" in stdout
    assert f"l1: {printed['raw_diff_l1']:.6f} l2: {printed['raw_diff_l2']:.6f}" in stdout
    assert f"[alpha] mean: {printed['alpha_mean']:.6f} std: {printed['alpha_std']:.6f}" in stdout
    assert f"binary / all (two-point fallback): {printed['binary']} / {printed['all']}" in stdout


def test_renormalized_rule_departs_where_documented(seeded):
    rng = np.random.default_rng(seeded)
    mu = np.concatenate([rng.uniform(1, 5, 400), [3.0, 1.0, 5.0]])
    s = np.concatenate([rng.uniform(0.25, 1.2, 400), [0.7, 0.0, 0.1]])
    ref = labels.soft_labels(mu, s, 5, density="pdf")
    new = labels.soft_labels(mu, s, 5, density="pdf", rule="renormalized")
    sums = new.probs.sum(axis=1)
    np.testing.assert_allclose(sums, 1.0, atol=1e-12)  # renormalized: every label sums to 1 ...
    assert (ref.probs[ref.clipped & ~ref.fallback].sum(axis=1) > 1 + 1e-9).all()  # ... the reference's do not
    assert np.allclose(ref.probs[-3], 0.2) and not np.allclose(new.probs[-3], 0.2)  # mu == 3: uniform vs not
    # the two-point labels: exact Eq. A2 vs the reference's widened intervals
    np.testing.assert_array_equal(new.probs[-2:], np.eye(5)[[0, 4]])
    np.testing.assert_allclose(ref.probs[-2:], np.eye(5)[[0, 4]], atol=2e-8)
    assert not np.array_equal(ref.probs[-2:], np.eye(5)[[0, 4]])
    with pytest.raises(UserError, match="label rule must be one of reference, renormalized"):
        labels.soft_labels(mu, s, rule="paper")


def test_one_hot_ranks_from_level_counts_equal_the_ranks_of_the_sorted_means(seeded):
    from scipy import stats

    rng = np.random.default_rng(seeded)
    for k in (2, 5, 12):
        level = rng.integers(0, k, 3000)
        level[:50] = k - 1  # ties everywhere, and a level nobody has when k is large
        means = labels.level_centers(k)[level]
        np.testing.assert_array_equal(labels._level_ranks(level, k), labels.average_ranks(means))
        np.testing.assert_array_equal(labels._level_ranks(level, k), stats.rankdata(means))
