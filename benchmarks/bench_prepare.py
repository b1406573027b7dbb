"""Times the label pipeline of `iqa prepare` on synthetic rows against a per-row Python loop of the same equations.

The pipeline: normalization to [1, 5], one-hot levels, Gaussian level probabilities, post-adjustment,
clipping, fallback to two-point interpolation, recovery of mean/std, and the Tables 1-2 statistics
(`iqa_cli.labels`), under the default `reference` label rule and under `renormalized`. Two per-row loops are
timed on a subset and extrapolated to the full row count, as printed: one with `scipy.stats.norm` per level
and numpy per row, the reference `gen_soft_label.py`'s rule written its way (checked against the vectorized
`reference` rule), and one with `math.erf`/`math.exp`, the fastest plain-Python way (the `renormalized`
rule, checked against it). One thread (OMP/MKL/OpenBLAS set to 1 below).

    .venv/bin/python benchmarks/bench_prepare.py [--rows 1000000] [--loop-rows 20000] [--scipy-rows 2000]
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from iqa_cli import labels  # noqa: E402


def synthetic_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MOS on a 0..100 scale (KonIQ/SPAQ-like) with rating stds of 4..25 points."""
    rng = np.random.default_rng(seed)
    mos = np.clip(rng.normal(55, 17, n), 0, 100)
    std = rng.uniform(4, 25, n)
    return mos, std


def vectorized(
    mos: np.ndarray, std: np.ndarray, k: int, density: str, rule: str = "reference"
) -> tuple[np.ndarray, dict]:
    lo, hi = labels.score_range(mos)
    mu, s = labels.normalize_scores(mos, std, lo=lo, hi=hi)
    soft = labels.soft_labels(mu, s, k, density=density, rule=rule)
    level = labels.one_hot_levels(mos, k, lo, hi)
    return soft.probs, labels.label_statistics(mu, s, soft, level)


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def loop_raw(m: float, sd: float, c: list[float], d: float, density: str) -> list[float]:
    if density == "cdf":
        return [_phi((ci + d / 2 - m) / sd) - _phi((ci - d / 2 - m) / sd) for ci in c]
    return [math.exp(-0.5 * ((ci - m) / sd) ** 2) / (sd * math.sqrt(2.0 * math.pi)) for ci in c]


def loop_label(m: float, sd: float, k: int, density: str, std_thr: float = 0.2, mean_thr: float = 0.1):
    """One row of the same equations, plain Python: (probs, alpha, beta, fallback)."""
    c = [1.0 + 4.0 * i / (k - 1) for i in range(k)]
    d, mid = 4.0 / (k - 1), 3.0
    ok = False
    raw = loop_raw(m, sd, c, d, density) if sd > 0 else [0.0] * k
    total = sum(raw)
    if total > 0:
        # the mixture weight is even in (mu - mid); beside the singular point it is taken at mid + 1e-4
        m_w = mid + 1e-4 if abs(m - mid) < 1e-4 else m
        raw_w = raw if m_w == m else loop_raw(m_w, sd, c, d, density)
        raw_mean = sum(p * ci for p, ci in zip(raw_w, c, strict=True)) / sum(raw_w)
        if raw_mean != mid:
            weight = (m_w - mid) / (raw_mean - mid)
            alpha, beta = weight / total, (1.0 - weight) / k
            probs = [max(alpha * p + beta, 0.0) for p in raw]
            s_probs = sum(probs)
            probs = [p / s_probs for p in probs]
            ok = abs(sum(p * ci for p, ci in zip(probs, c, strict=True)) - m) <= mean_thr
    if sd < std_thr or not ok:
        t = (m - 1.0) / d
        lower = min(max(math.floor(t), 0), k - 2)
        w = min(max(t - lower, 0.0), 1.0)
        probs = [0.0] * k
        probs[lower], probs[lower + 1] = 1.0 - w, w
        return probs, 1.0, 0.0, True
    return probs, alpha, beta, False


def scipy_row_label(m: float, sd: float, k: int, density: str, std_thr: float = 0.2, mean_thr: float = 0.1):
    """One row the way the reference `gen_soft_label.py` writes it: scipy.stats.norm per level, numpy per row,
    its rule (+1e-9 in alpha, no renormalization, fallback over intervals widened by 1e-8)."""
    c = np.linspace(1.0, 5.0, k)
    d = 4.0 / (k - 1)
    if density == "cdf":
        raw = np.array([stats.norm.cdf(ci + d / 2, m, sd) - stats.norm.cdf(ci - d / 2, m, sd) for ci in c])
    else:
        raw = np.array([stats.norm.pdf(ci, loc=m, scale=sd) for ci in c])
    a_sum, b_sum = raw.sum(), np.inner(raw, c)
    alpha = (m - 3.0) / (b_sum - 3.0 * a_sum + 1e-9)
    beta = (1.0 - alpha * a_sum) / k
    probs = np.maximum(alpha * raw + beta, 0.0)
    if not (sd < std_thr or abs(np.inner(probs, c) - m) > mean_thr):
        return probs.tolist(), float(alpha), float(beta), False
    probs = np.zeros(k)
    for i in range(k - 1):
        left, right = c[i] - 1e-8, c[i + 1] + 1e-8
        if left < m <= right:
            probs[i], probs[i + 1] = (right - m) / (right - left), (m - left) / (right - left)
            break
    return probs.tolist(), 1.0, 0.0, True


def loop_pipeline(mos: np.ndarray, std: np.ndarray, k: int, density: str, row_label=None) -> tuple[list, dict]:
    """Per-row loop over normalization, level, label, recovery and the per-row statistics terms."""
    mos_list, std_list = mos.tolist(), std.tolist()
    lo, hi = min(mos_list), max(mos_list)
    c = [1.0 + 4.0 * i / (k - 1) for i in range(k)]
    all_probs, mus, rec_means, hot_means = [], [], [], []
    l1 = sq = js = w2 = hot_l1 = 0.0
    fallbacks = 0
    for raw_m, raw_s in zip(mos_list, std_list, strict=True):
        m = 4.0 * (raw_m - lo) / (hi - lo) + 1.0
        sd = 4.0 * raw_s / (hi - lo)
        level = k - 1
        for i in range(k):
            if m <= 1.0 + (i + 1) / k * 4.0 + 1e-8:
                level = i
                break
        probs, _, _, fb = (row_label or loop_label)(m, sd, k, density)
        fallbacks += fb
        mean = sum(p * ci for p, ci in zip(probs, c, strict=True))
        var = sum(p * (ci - mean) ** 2 for p, ci in zip(probs, c, strict=True))
        rec_sd = math.sqrt(max(var, 0.0))
        l1 += abs(mean - m)
        sq += (mean - m) ** 2
        hot_l1 += abs(c[level] - m)
        s_m = math.sqrt(0.5 * (sd * sd + rec_sd * rec_sd))
        mu_m = 0.5 * (m + mean)
        for a, b in ((m, max(sd, 1e-8)), (mean, max(rec_sd, 1e-8))):
            js += 0.5 * (math.log(s_m / b) + (b * b + (a - mu_m) ** 2) / (2 * s_m * s_m) - 0.5)
        w2 += math.hypot(m - mean, sd - rec_sd)
        all_probs.append(probs)
        mus.append(m)
        rec_means.append(mean)
        hot_means.append(c[level])
    n = len(mos_list)
    summary = {
        "soft_l1": l1 / n,
        "soft_rmse": math.sqrt(sq / n),
        "soft_js": js / n,
        "soft_wasserstein": w2 / n,
        "one_hot_l1": hot_l1 / n,
        "one_hot_plcc": stats.pearsonr(hot_means, mus)[0],
        "soft_plcc": stats.pearsonr(rec_means, mus)[0],
        "soft_srcc": stats.spearmanr(rec_means, mus)[0],
        "fallback": fallbacks,
    }
    return all_probs, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--loop-rows", type=int, default=20_000, help="rows timed in the math.erf loop")
    parser.add_argument("--scipy-rows", type=int, default=2_000, help="rows timed in the scipy-per-level loop")
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--density", choices=labels.DENSITIES, default="cdf")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    mos, std = synthetic_rows(args.rows)
    print(
        f"label pipeline, {args.rows:,} synthetic rows, K={args.levels}, density={args.density}, 1 thread "
        f"(python {platform.python_version()}, numpy {np.__version__}, {platform.processor() or platform.machine()})"
    )
    bests = {}
    for rule in labels.LABEL_RULES:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            _, summary = vectorized(mos, std, args.levels, args.density, rule)
            times.append(time.perf_counter() - start)
        bests[rule] = min(times)
        print(
            f"vectorized, --label-rule {rule}: best of {args.repeat} {bests[rule]:.3f} s (all: "
            f"{', '.join(f'{t:.3f}' for t in times)}) -> {args.rows / bests[rule]:,.0f} rows/s; "
            f"fallback {summary['fallback']:,}, clipped {summary['clipped']:,}"
        )
    best = bests["reference"]

    sub_mos, sub_std = mos[: args.loop_rows].copy(), std[: args.loop_rows].copy()
    sub_mos[:2] = [mos.min(), mos.max()]  # same min/max as the full set, so the labels compare row by row
    rates = {}
    for name, row_label, n_rows, rule in (
        ("per-row loop, math.erf (renormalized rule)", loop_label, args.loop_rows, "renormalized"),
        ("per-row loop, scipy.stats.norm per level (the reference)", scipy_row_label, args.scipy_rows, "reference"),
    ):
        start = time.perf_counter()
        loop_probs, _ = loop_pipeline(sub_mos[:n_rows], sub_std[:n_rows], args.levels, args.density, row_label)
        elapsed = time.perf_counter() - start
        rates[name] = n_rows / elapsed
        vec_probs, _ = vectorized(sub_mos[:n_rows], sub_std[:n_rows], args.levels, args.density, rule)
        diff = float(np.abs(np.asarray(loop_probs) - vec_probs).max())
        print(
            f"{name}: {n_rows:,} rows in {elapsed:.3f} s -> {rates[name]:,.0f} rows/s; extrapolated to "
            f"{args.rows:,} rows: {args.rows / rates[name]:,.1f} s (max |label difference| vs vectorized: {diff:.1e})"
        )
    for (name, rate), rule in zip(rates.items(), ("renormalized", "reference"), strict=True):
        print(f"speed-up over the {name}: {args.rows / bests[rule] / rate:,.0f}x")
    print(f"1M rows in {best * 1_000_000 / args.rows:.2f} s (vectorized, default reference rule)")


if __name__ == "__main__":
    main()
