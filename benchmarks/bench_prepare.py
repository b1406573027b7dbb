"""Times `iqa prepare` on 1M synthetic rows end to end, stage by stage, and its label pipeline against per-row loops.

End to end: `prepare_dataset` on a 1M-row CSV (custom preset: read, clean, duplicate check, outlier check,
seeded split, normalization, soft labels, one-hot levels, Tables 1-2 statistics, Parquet write), each stage
timed inside the same runs by wrapping the functions `prepare_dataset` calls (the rest is frame assembly).
The seeded split, the duplicate check and the outlier check are also timed against the way they were
first written (`pd.unique` + a Python set + `isin`; `duplicated` twice; a stable sort of every row),
interleaved in the same run, and checked to give the same rows.

The label pipeline: normalization to [1, 5], one-hot levels, Gaussian level probabilities, post-adjustment,
clipping, fallback to two-point interpolation, recovery of mean/std, and the Tables 1-2 statistics
(`iqa_cli.labels`), under the default `reference` label rule and under `renormalized`. Two per-row loops are
timed on a subset and extrapolated to the full row count, as printed: one with `scipy.stats.norm` per level
and numpy per row, the reference `gen_soft_label.py`'s rule written its way (checked against the vectorized
`reference` rule), and one with `math.erf`/`math.exp`, the fastest plain-Python way (the `renormalized`
rule, checked against it). One thread (OMP/MKL/OpenBLAS set to 1 below, Arrow's pools to 1).

With --baseline DIR, prepare_dataset of another version of iqa_cli is timed in turns with this checkout's,
each run in a fresh process.

    .venv/bin/python benchmarks/bench_prepare.py [--rows 1000000] [--loop-rows 20000] [--scipy-rows 2000]
        [--baseline DIR]
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
from scipy import stats  # noqa: E402

from iqa_cli import labels, prepare  # noqa: E402
from iqa_cli.datasets import ReadOptions  # noqa: E402

pa.set_cpu_count(1)
pa.set_io_thread_count(1)

# what prepare_dataset calls, timed inside its runs: (module, function name, stage name)
STAGES = (
    (None, "reader", "read the CSV"),
    (prepare, "_clean", "clean (numeric MOS/std, drop rows)"),
    (prepare, "group_codes", "hash the names (duplicates + split groups)"),
    (prepare, "first_repeat", "first duplicate"),
    (prepare, "_outlier_note", "MOS outlier check"),
    (prepare, "seeded_test_rows", "seeded split"),
    (prepare, "_split_names", "split column"),
    (labels, "normalize_scores", "normalize to [1, 5]"),
    (labels, "soft_labels", "soft labels"),
    (labels, "gaussian_level_probs", "  of which Gaussian level probabilities"),
    (labels, "one_hot_levels", "one-hot levels"),
    (labels, "label_statistics", "label statistics (Tables 1-2)"),
    (prepare, "write_meta", "write Parquet"),
)


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


def synthetic_csv(path: Path, n: int) -> Path:
    """A custom-preset score table: unique image names, MOS 0..100, rating stds."""
    mos, std = synthetic_rows(n)
    names = pd.Series(np.arange(n)).map("images/{:07d}.jpg".format)
    pd.DataFrame({"image": names, "mos": mos, "std": std}).to_csv(path, index=False)
    return path


def reference_seeded_split(frame: pd.DataFrame, test_frac: float, seed: int) -> np.ndarray:
    """The seeded split as first written: pd.unique, a Python set of the test groups, isin."""
    groups = frame["ref"].fillna(frame["image"]) if "ref" in frame else frame["image"]
    unique = pd.unique(groups)
    order = np.random.default_rng(seed).permutation(len(unique))
    test = set(unique[order[: round(test_frac * len(unique))]])
    return groups.isin(test).to_numpy()


def reference_duplicates(images: pd.Series) -> tuple[int, object]:
    """The duplicate check as first written: `duplicated` for the count and again for the first name."""
    count = int(images.duplicated().sum())
    return count, images[images.duplicated()].iloc[0] if count else None


def new_duplicates(images: pd.Series) -> tuple[int, object]:
    codes, groups = prepare.group_codes(images)
    first = prepare.first_repeat(codes)
    return len(images) - groups, None if first is None else images.iloc[first]


def reference_mos_outliers(mos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The outlier check as first written, on a stable sort of every row."""
    n = mos.size
    order = np.argsort(mos, kind="stable")
    ordered = mos[order]
    q1, q3 = np.percentile(ordered, [25, 75])
    m = max(1, n // 100)
    gaps = np.diff(ordered) > prepare.OUTLIER_GAP * (q3 - q1)
    low_cut, high_cut = np.flatnonzero(gaps[:m]), np.flatnonzero(gaps[n - 1 - m :])
    return order[: low_cut[-1] + 1] if low_cut.size else order[:0], order[
        n - m + high_cut[0] :
    ] if high_cut.size else order[:0]


def timed_prepare(config: prepare.PrepareConfig) -> tuple[float, dict[str, float]]:
    """One prepare_dataset run; its total and the time spent in each stage, measured inside the run."""
    times: dict[str, float] = {}
    originals = []
    get_dataset = prepare.get_dataset
    spec = get_dataset(config.dataset)
    read = _timer(spec.reader, "read the CSV", times)
    prepare.get_dataset = lambda name: dataclasses.replace(spec, reader=read)
    for module, name, stage in STAGES[1:]:
        originals.append((module, name, getattr(module, name)))
        setattr(module, name, _timer(getattr(module, name), stage, times))
    try:
        start = time.perf_counter()
        prepare.prepare_dataset(config)
        total = time.perf_counter() - start
    finally:
        prepare.get_dataset = get_dataset
        for module, name, original in originals:
            setattr(module, name, original)
    return total, times


def _timer(function, stage: str, times: dict):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            times[stage] = times.get(stage, 0.0) + time.perf_counter() - start

    return timed


def interleaved(rounds: int, old, new) -> tuple[float, float, bool]:
    """Best times of old() and new(), alternated in `rounds` rounds, and whether they gave the same result."""
    best_old = best_new = math.inf
    same = True
    for _ in range(rounds):
        start = time.perf_counter()
        a = old()
        best_old = min(best_old, time.perf_counter() - start)
        start = time.perf_counter()
        b = new()
        best_new = min(best_new, time.perf_counter() - start)
        same &= (
            all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
            if isinstance(a, tuple)
            else bool(np.array_equal(a, b))
        )
    return best_old, best_new, same


CHILD = """
import os, sys, time
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[var] = "1"
from pathlib import Path
import pyarrow as pa
pa.set_cpu_count(1)
pa.set_io_thread_count(1)
from iqa_cli.datasets import ReadOptions
from iqa_cli.prepare import PrepareConfig, prepare_dataset
config = PrepareConfig(dataset="custom", source=Path(sys.argv[1]), out=Path(sys.argv[2]),
                       read_options=ReadOptions(image_col="image", mos_col="mos", std_col="std"))
start = time.perf_counter()
prepare_dataset(config)
print(time.perf_counter() - start)
"""


def versus_baseline(baseline: Path, source: Path, out: Path, rounds: int) -> None:
    """prepare_dataset of another checkout's iqa_cli and of this one, each in a fresh process, in turns."""
    import subprocess
    import sys

    here = Path(__file__).resolve().parents[1]
    best = {"baseline": math.inf, "this checkout": math.inf}
    for _ in range(rounds):
        for name, root in (("baseline", baseline), ("this checkout", here)):
            env = {**os.environ, "PYTHONPATH": str(root)}
            result = subprocess.run(
                [sys.executable, "-c", CHILD, str(source), str(out)], env=env, cwd=root, capture_output=True, text=True
            )
            if result.returncode:
                raise SystemExit(f"{name} ({root}) failed: {result.stderr.strip()[-2000:]}")
            best[name] = min(best[name], float(result.stdout.strip().splitlines()[-1]))
    print(
        f"  end to end in fresh processes, best of {rounds} in turns: baseline {baseline} {best['baseline']:.3f} s, "
        f"this checkout {best['this checkout']:.3f} s ({best['baseline'] / best['this checkout']:.2f}x)"
    )


def cold_cli(source: Path, out: Path, rounds: int) -> None:
    """`iqa prepare` itself in a fresh process on one core (this process's first CPU), launch to exit: the
    command a user runs, imports (pandas, pyarrow, scipy.special) included."""
    import subprocess
    import sys

    core = min(os.sched_getaffinity(0))
    command = [sys.executable, "-m", "iqa_cli", "prepare", "custom", "--csv", str(source), "--image-col", "image",
               "--mos-col", "mos", "--std-col", "std"]  # fmt: skip
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = subprocess.run(
            command, capture_output=True, text=True, preexec_fn=lambda: os.sched_setaffinity(0, {core})
        )
        times.append(time.perf_counter() - start)
        if result.returncode:
            raise SystemExit(f"iqa prepare failed: {result.stderr.strip()[-2000:]}")
    print(f"  `iqa prepare custom` in a fresh process on one core (CPU {core}), launch to exit: best of {rounds} "
          f"{min(times):.3f} s (all: {', '.join(f'{t:.3f}' for t in times)})")  # fmt: skip


def end_to_end(rows: int, repeat: int, baseline: Path | None = None) -> float:
    """Prints prepare_dataset's time for `rows` rows and its stages, and the old vs new split; returns the best."""
    with tempfile.TemporaryDirectory() as tmp:
        source = synthetic_csv(Path(tmp) / "scores.csv", rows)
        config = prepare.PrepareConfig(
            dataset="custom",
            source=source,
            out=Path(tmp) / "out.parquet",
            read_options=ReadOptions(image_col="image", mos_col="mos", std_col="std"),
        )
        runs = [timed_prepare(config) for _ in range(repeat)]
        best, stage_times = min(runs, key=lambda run: run[0])
        print(
            f"iqa prepare end to end (prepare_dataset, custom preset, {rows:,}-row CSV -> Parquet): best of {repeat} "
            f"{best:.3f} s (all: {', '.join(f'{t:.3f}' for t, _ in runs)})"
        )
        print("  stages of the best run:")
        for _, _, stage in STAGES:
            print(f"    {stage:45s} {stage_times.get(stage, 0.0):7.3f} s")
        staged = sum(t for stage, t in stage_times.items() if not stage.startswith("  "))
        print(f"    {'rest (frame assembly, checks)':45s} {best - staged:7.3f} s")

        cold_cli(source, Path(tmp) / "cli.parquet", repeat)
        if baseline is not None:
            versus_baseline(baseline, source, Path(tmp) / "baseline.parquet", repeat)
        frame = pd.read_csv(source)
        mos = frame["mos"].to_numpy()
        checks = (
            (
                "seeded split (pd.unique + set + isin -> factorize + boolean table)",
                reference_seeded_split,
                lambda f, frac, seed: prepare.seeded_test_rows(f, frac, seed),
                (frame, 0.2, 0),
            ),
            (
                "duplicate check (duplicated -> the same factorize codes)",
                reference_duplicates,
                new_duplicates,
                (frame["image"],),
            ),
            (
                "MOS outlier check (stable sort -> partition of the extremes)",
                reference_mos_outliers,
                prepare._mos_outliers,
                (mos,),
            ),
        )
        for name, old, new, args in checks:
            t_old, t_new, same = interleaved(
                3, lambda old=old, args=args: old(*args), lambda new=new, args=args: new(*args)
            )
            print(f"  {name}: {t_old:.3f} s -> {t_new:.3f} s ({t_old / t_new:.1f}x), same result: {same}")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--loop-rows", type=int, default=20_000, help="rows timed in the math.erf loop")
    parser.add_argument("--scipy-rows", type=int, default=2_000, help="rows timed in the scipy-per-level loop")
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--density", choices=labels.DENSITIES, default="cdf")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prepare-repeat", type=int, default=3, help="end-to-end prepare_dataset runs")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a folder holding another version's iqa_cli (`git archive REV iqa_cli | tar -x -C DIR`): its "
        "prepare_dataset and this checkout's are timed in turns, each in a fresh process",
    )
    args = parser.parse_args()

    print(
        f"python {platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}, pyarrow "
        f"{pa.__version__}, {platform.processor() or platform.machine()}, 1 thread"
    )
    prepare_best = end_to_end(args.rows, args.prepare_repeat, args.baseline)

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
    reference_loop = args.rows / rates["per-row loop, scipy.stats.norm per level (the reference)"]
    print(
        f"iqa prepare end to end {prepare_best:.2f} s vs the reference-style per-row label loop alone "
        f"{reference_loop:,.0f} s (extrapolated): {reference_loop / prepare_best:,.0f}x"
    )


if __name__ == "__main__":
    main()
