"""`iqa eval`: joins, counts, per-dataset numbers against scipy, JSON, plots, and one-line errors."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import optimize, stats

from iqa_cli.errors import UserError
from iqa_cli.evaluate import ABSOLUTE, AMBIGUOUS, DUPLICATE, EXACT, SUFFIX, UNMATCHED, evaluate, match_images
from tests.conftest import run_iqa

IMAGE_ROOT = "/datasets/iqa"
# The CLI prints errors through a rich console that wraps at the terminal width (80 in a pipe); widen it so
# that "one line" checks the message, not the console's wrapping.
WIDE = {"COLUMNS": "400"}


def write_meta(path: Path, frame: pd.DataFrame, metadata: dict[str, str] | None = None) -> Path:
    """A meta as `iqa prepare` writes it: the columns of docs/METHOD.md plus key-value metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    kv = {"image_root": IMAGE_ROOT, "level_names": "bad,poor,fair,good,excellent", "density": "pdf"}
    kv.update(metadata or {})
    pq.write_table(table.replace_schema_metadata({k.encode(): v.encode() for k, v in kv.items()}), path)
    return path


def write_predictions(path: Path, images: list[str], score, std, error=None, score_reg=None) -> Path:
    """Predictions as `iqa score` writes them (docs/METHOD.md, "Files iqa writes")."""
    n = len(images)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=n).astype(np.float32)
    columns = {
        "image": pa.array(images, pa.string()),
        "score": pa.array(np.asarray(score, dtype=np.float32)),
        "std": pa.array(np.asarray(std, dtype=np.float32)),
        "probs": pa.array(list(probs), pa.list_(pa.float32())),
        "level": pa.array(["fair"] * n),
        "width": pa.array(np.full(n, 640, dtype=np.int32)),
        "height": pa.array(np.full(n, 480, dtype=np.int32)),
        "error": pa.array(error if error is not None else [None] * n, pa.string()),
    }
    if score_reg is not None:
        columns["score_reg"] = pa.array(np.asarray(score_reg, dtype=np.float32))
    table = pa.table(columns).replace_schema_metadata({b"model": b"tiny", b"iqa_version": b"0.1.0"})
    pq.write_table(table, path)
    return path


@pytest.fixture
def two_datasets(tmp_path, seeded):
    """A prepare-style meta with two datasets and splits, and predictions with absolute paths.

    Predictions: every meta image but the last three of spaq, one image not in the meta, and one failed row.
    """
    rng = np.random.default_rng(seeded)
    n_per = 40
    rows = []
    for dataset, top in (("koniq", 100.0), ("spaq", 10.0)):
        mos = rng.uniform(0, top, n_per)
        std = rng.uniform(0.05, 0.2, n_per) * top
        lo, hi = mos.min(), mos.max()
        for i in range(n_per):
            rows.append(
                {
                    "image": f"{dataset}/img_{i:03d}.jpg",
                    "dataset": dataset,
                    "split": "train" if i % 4 == 0 else "test",
                    "mos": mos[i],
                    "std": std[i],
                    "mos_norm": 4 * (mos[i] - lo) / (hi - lo) + 1,
                    "std_norm": 4 * std[i] / (hi - lo),
                    "level": 0,
                    "soft_label": [0.2] * 5,
                }
            )
    meta = pd.DataFrame(rows)
    meta_path = write_meta(tmp_path / "meta.parquet", meta)

    keep = meta.iloc[:-3].reset_index(drop=True)
    score = np.clip(np.exp(keep["mos_norm"] / 2.5) + rng.normal(scale=0.3, size=len(keep)), 1, 5)
    std = rng.uniform(0.2, 0.9, size=len(keep))
    error = [None] * len(keep)
    failed = 5  # koniq/img_005.jpg, a test image
    error[failed], score[failed] = "cannot identify image file", np.nan
    images = [f"{IMAGE_ROOT}/{p}" for p in keep["image"]] + [f"{IMAGE_ROOT}/other/stray.jpg"]
    pred_path = write_predictions(
        tmp_path / "pred.parquet",
        images,
        np.r_[score, 3.0],
        np.r_[std, 0.5],
        [*error, None],
        score_reg=np.r_[keep["mos_norm"] * 0.9 + rng.normal(scale=0.2, size=len(keep)), 3.0],
    )
    # what the file holds: float32
    expected = keep.assign(score=score.astype(np.float32).astype(float), pred_std=std.astype(np.float32).astype(float))
    expected = expected[(expected["split"] == "test") & expected["score"].notna()]
    return {"meta": meta_path, "pred": pred_path, "expected": expected, "failed": keep["image"][failed]}


def _logistic_reference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """DeQA-Score/pyiqa `fit_curve` recipe, written out independently."""

    def curve(x, b1, b2, b3, b4):
        return (b1 - b2) / (1 + np.exp(-(x - b3) / b4)) + b2

    params, _ = optimize.curve_fit(curve, x, y, p0=[y.max(), y.min(), x.mean(), x.std() / 4], maxfev=10000)
    return curve(x, *params)


def _check_numbers(result: dict, part: pd.DataFrame) -> None:
    x, y = part["score"].to_numpy(float), part["mos_norm"].to_numpy(float)
    assert result["n"] == len(part)
    assert result["plcc"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-6)
    assert result["srcc"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-6)
    assert result["krcc"] == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-6)
    assert result["rmse"] == pytest.approx(np.sqrt(np.mean((x - y) ** 2)), rel=1e-6)
    fitted = _logistic_reference(x, y)
    assert result["plcc_logistic"] == pytest.approx(stats.pearsonr(fitted, y).statistic, abs=1e-5)
    assert result["rmse_logistic"] == pytest.approx(np.sqrt(np.mean((fitted - y) ** 2)), rel=1e-4)
    s_h, s_p = part["std_norm"].to_numpy(float), part["pred_std"].to_numpy(float)
    kl = np.log(s_p / s_h) + (s_h**2 + (y - x) ** 2) / (2 * s_p**2) - 0.5
    assert result["kl"] == pytest.approx(kl.mean(), rel=1e-5)
    assert result["w2"] == pytest.approx(np.hypot(x - y, s_p - s_h).mean(), rel=1e-5)
    assert 0 < result["js"] < math.log(2)


def test_cli_eval_per_dataset_numbers_counts_json_and_plot(two_datasets, tmp_path):
    out_json, out_png = tmp_path / "out" / "metrics.json", tmp_path / "out" / "scatter.png"
    result = run_iqa(
        "eval", str(two_datasets["pred"]), "--gt", str(two_datasets["meta"]), "--json", str(out_json),
        "--plot", str(out_png), env=WIDE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(out_json.read_text())
    expected = two_datasets["expected"]
    assert report["split"] == "test" and report["target"] == "mos_norm"
    assert [r["dataset"] for r in report["results"]] == ["koniq", "spaq", "all"]
    for row in report["results"]:
        part = expected if row["dataset"] == "all" else expected[expected["dataset"] == row["dataset"]]
        _check_numbers(row, part)
    counts = report["counts"]
    assert counts["scored"] == len(expected)
    assert counts["failed"] == 1 and report["examples"]["failed"] == [f"{IMAGE_ROOT}/{two_datasets['failed']}"]
    assert counts["unmatched_predictions"] == 1
    assert report["examples"]["unmatched_predictions"] == [f"{IMAGE_ROOT}/other/stray.jpg"]
    # spaq/img_037..039 have no prediction; img_036 is a train image
    assert counts["missing_predictions"] == 3
    assert report["examples"]["missing_predictions"] == [f"spaq/img_{i:03d}.jpg" for i in (37, 38, 39)]
    assert counts["outside_split"] == 20
    assert report["matched_by"]["image_root"] == counts["matched"]

    # stdout: the table with each dataset's numbers as printed; stderr: the unmatched rows, one line each
    for row in report["results"]:
        line = next(ln for ln in result.stdout.splitlines() if ln.strip().startswith(row["dataset"] + " "))
        assert f"{row['plcc']:.4f}" in line and f"{row['srcc']:.4f}" in line and str(row["n"]) in line
        gaps = [ln for ln in result.stdout.splitlines() if ln.strip().startswith(row["dataset"] + " ")][1]
        assert f"{row['kl']:.4f}" in gaps and f"{row['js']:.4f}" in gaps and f"{row['w2']:.4f}" in gaps
    assert "1 predictions have no ground truth (e.g. /datasets/iqa/other/stray.jpg)" in result.stderr
    assert "3 ground-truth images have no prediction" in result.stderr
    assert "1 predictions failed" in result.stderr

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(out_png).shape[:2]
    assert width > height > 100  # two panels side by side


def test_cli_eval_json_to_stdout_and_quiet(two_datasets, tmp_path):
    """`--json -` prints the same document `--json FILE` writes, and nothing else on stdout; `-q` silences stderr."""
    out_json = tmp_path / "metrics.json"
    args = ["eval", str(two_datasets["pred"]), "--gt", str(two_datasets["meta"])]
    to_file = run_iqa(*args, "--json", str(out_json))
    to_stdout = run_iqa(*args, "--json", "-", "-q")
    assert to_file.returncode == to_stdout.returncode == 0, to_stdout.stderr
    assert json.loads(to_stdout.stdout) == json.loads(out_json.read_text())
    assert to_stdout.stderr == "" and "predictions have no ground truth" in to_file.stderr
    quiet_tables = run_iqa(*args, "-q")
    assert quiet_tables.stderr == "" and "koniq" in quiet_tables.stdout


def test_split_selection(two_datasets):
    everything = evaluate(two_datasets["pred"], two_datasets["meta"], split="all")
    assert everything.split == "all"
    assert everything.counts["outside_split"] == 0 and everything.counts["missing_predictions"] == 3
    assert everything.counts["scored"] == 80 - 3 - 1
    train = evaluate(two_datasets["pred"], two_datasets["meta"], split="train")
    assert train.counts["scored"] == 20  # every 4th image; the failed and the missing ones are test images
    meta = pq.read_table(two_datasets["meta"]).to_pandas()
    no_split = write_meta(two_datasets["meta"].with_name("nosplit.parquet"), meta.drop(columns=["split"]))
    assert evaluate(two_datasets["pred"], no_split).split == "all"
    with pytest.raises(UserError, match="no `split` column; use --split all"):
        evaluate(two_datasets["pred"], no_split, split="test")
    with pytest.raises(UserError, match="--split must be one of test, train, all"):
        evaluate(two_datasets["pred"], two_datasets["meta"], split="val")
    with pytest.raises(UserError, match="--split must be one of"):  # said before the tables are read
        evaluate(two_datasets["pred"].with_name("absent.parquet"), two_datasets["meta"], split="val")


def test_score_reg_column_and_ground_truth_inside_predictions(two_datasets, tmp_path):
    report = evaluate(two_datasets["pred"], two_datasets["meta"], column="score_reg")
    assert report.column == "score_reg"
    assert all(g.metrics.kl is None for g in report.results)
    assert any("score_reg" in note for note in report.notes)
    part = report.matched
    assert report.results[-1].metrics.plcc == pytest.approx(stats.pearsonr(part["pred"], part["target"]).statistic)

    # predictions that carry their own ground truth columns need no --gt
    frame = pq.read_table(two_datasets["pred"]).to_pandas()
    frame["mos_norm"] = frame["score"] * 0.5 + np.linspace(0, 1, len(frame))
    frame["std_norm"] = 0.4
    frame["dataset"] = "mine"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "with_gt.parquet")
    own = evaluate(tmp_path / "with_gt.parquet")
    ok = frame[frame["error"].isna()]
    assert own.counts["scored"] == len(ok) and own.results[0].name == "mine"
    assert own.results[0].metrics.plcc == pytest.approx(stats.pearsonr(ok["score"], ok["mos_norm"]).statistic)
    kl = np.log(ok["std"] / 0.4) + (0.4**2 + (ok["mos_norm"] - ok["score"]) ** 2) / (2 * ok["std"] ** 2) - 0.5
    assert own.results[0].metrics.kl == pytest.approx(kl.mean(), rel=1e-5)


def test_cli_csv_ground_truth_with_relative_paths_and_suffix_matching(tmp_path):
    """Predictions scored from another directory still join by path suffix; raw mos is used as given."""
    rng = np.random.default_rng(3)
    names = [f"photos/{c}/{i}.jpg" for c in ("a", "b") for i in range(10)]
    mos = rng.uniform(1, 5, len(names))
    pd.DataFrame({"image": names, "mos": mos}).to_csv(tmp_path / "gt.csv", index=False)
    score = mos + rng.normal(scale=0.5, size=len(names))
    preds = [f"../elsewhere/{n}" for n in names[:-1]] + ["x/1.jpg"]  # last one: 1.jpg exists in a/ and b/
    write_predictions(tmp_path / "pred.parquet", preds, score, np.full(len(names), 0.5))
    result = run_iqa("eval", "pred.parquet", "--gt", "gt.csv", "--json", "m.json", cwd=tmp_path, env=WIDE)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["target"] == "mos" and report["split"] == "all"
    assert report["matched_by"] == {"exact": 0, "image_root": 0, "suffix": 19, "key": 0}
    assert report["counts"]["ambiguous_predictions"] == 1 and report["examples"]["ambiguous_predictions"] == ["x/1.jpg"]
    assert report["counts"]["missing_predictions"] == 1
    [row] = report["results"]
    assert row["dataset"] == "all" and row["n"] == 19
    assert row["plcc"] == pytest.approx(stats.pearsonr(score[:-1], mos[:-1]).statistic, abs=1e-6)
    assert row["rmse"] == pytest.approx(np.sqrt(np.mean((score[:-1] - mos[:-1]) ** 2)), rel=1e-5)
    assert row["kl"] is None  # the CSV has no std
    assert "KL" not in result.stdout
    assert "match several ground-truth images" in result.stderr
    assert "DMOS" not in result.stderr

    # The same scores against a DMOS-like column (lower is better): the numbers as they are, and a warning.
    pd.DataFrame({"image": names, "mos": 6 - mos}).to_csv(tmp_path / "dmos.csv", index=False)
    flipped = run_iqa("eval", "pred.parquet", "--gt", "dmos.csv", cwd=tmp_path, env=WIDE)
    assert flipped.returncode == 0, flipped.stderr
    [warning] = [line for line in flipped.stderr.splitlines() if "DMOS" in line]
    srcc = stats.spearmanr(score[:-1], 6 - mos[:-1]).statistic
    assert warning.startswith(f"warning [all]: SRCC is {srcc:.3f}") and "iqa prepare" in warning


def test_match_images_passes():
    gt = ["koniq/a.jpg", "koniq/sub/b.jpg", "spaq/c.jpg", "x/d.jpg", "y/d.jpg"]
    preds = [
        "koniq/a.jpg",  # exact
        "./koniq\\sub//b.jpg",  # exact after normalization
        "/data/root/spaq/c.jpg",  # under the image root
        "c.jpg",  # suffix, but spaq/c.jpg is already taken by a better match
        "d.jpg",  # ambiguous: x/d.jpg or y/d.jpg
        "/mnt/x/d.jpg",  # unique suffix
        "nothing.jpg",
        None,
    ]
    match = match_images(preds, gt, roots=["/data/root"], cwd="/home/me")
    assert match.gt_index.tolist() == [0, 1, 2, -1, -1, 3, -1, -1]
    assert match.how.tolist() == [EXACT, EXACT, ABSOLUTE, DUPLICATE, AMBIGUOUS, SUFFIX, UNMATCHED, UNMATCHED]
    # relative predictions are anchored at the current directory when compared under the root
    match = match_images(["root/spaq/c.jpg"], ["spaq/c.jpg", "other/c.jpg"], roots=["/data/root"], cwd="/data")
    assert match.gt_index.tolist() == [0] and match.how.tolist() == [ABSOLUTE]


def test_degenerate_dataset_is_reported_not_fatal(tmp_path):
    names = [f"{d}/{i}.jpg" for d in ("flat", "fine") for i in range(6)]
    mos = np.r_[np.linspace(1, 5, 6), np.linspace(1, 5, 6)]
    frame = pd.DataFrame({"image": names, "dataset": [n.split("/")[0] for n in names], "mos": mos})
    frame.to_csv(tmp_path / "gt.csv", index=False)
    score = np.r_[np.full(6, 3.0), np.linspace(1, 5, 6) ** 1.5]
    write_predictions(tmp_path / "pred.parquet", names, score, np.full(12, 0.3))
    report = evaluate(tmp_path / "pred.parquet", tmp_path / "gt.csv")
    by_name = {g.name: g.metrics for g in report.results}
    assert math.isnan(by_name["flat"].plcc) and not by_name["flat"].logistic_converged
    assert "predictions are constant" in by_name["flat"].notes[0]
    assert by_name["fine"].srcc == pytest.approx(1.0)
    assert next(r for r in report.to_dict()["results"] if r["dataset"] == "flat")["plcc"] is None


def _one_line_error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "broken.parquet").write_bytes(b"not really parquet")
    pd.DataFrame({"file": ["a.jpg"], "quality": [3.0]}).to_csv(tmp_path / "wrong.csv", index=False)
    pd.DataFrame({"image": ["zzz/1.jpg", "zzz/2.jpg"], "mos": [1.0, 2.0]}).to_csv(tmp_path / "other.csv", index=False)
    few = pd.DataFrame({"image": ["koniq/img_001.jpg", "koniq/img_002.jpg", "zzz/1.jpg"], "mos": [1.0, 2.0, 3.0]})
    few.to_csv(tmp_path / "few.csv", index=False)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("missing.parquet", "--gt", "{meta}"), "predictions file not found: missing.parquet"),
        (("{pred}", "--gt", "{dir}/notes.txt"), "is not a Parquet or CSV file"),
        (("{pred}", "--gt", "{dir}/broken.parquet"), "cannot read ground truth file"),
        (("{pred}", "--gt", "{dir}/wrong.csv"), "has no column 'image', 'mos' (columns found: file, quality)"),
        (("{pred}", "--gt", "{dir}/other.csv"), "no image in"),
        (("{pred}", "--gt", "{dir}/few.csv"), "only 2 scored predictions"),
        (("{pred}",), "pass --gt"),
        (("{pred}", "--gt", "{meta}", "--column", "score_reg2"), "--column must be one of score, score_reg"),
    ],
    ids=["missing", "not-table", "broken-parquet", "missing-column", "no-overlap", "too-few", "no-gt", "bad-column"],
)
def test_cli_bad_inputs_exit_2_with_one_line(two_datasets, bad_files, args, message):
    names = {"pred": two_datasets["pred"], "meta": two_datasets["meta"], "dir": bad_files}
    line = _one_line_error(run_iqa("eval", *(a.format(**names) for a in args), env=WIDE))
    assert message in line, line


def test_missing_columns_are_listed(two_datasets, tmp_path):
    write_predictions(tmp_path / "p.parquet", ["a.jpg"], [3.0], [0.5])
    with pytest.raises(UserError, match=r"no column 'score_reg' \(columns found: image, score, std, probs, level"):
        evaluate(tmp_path / "p.parquet", two_datasets["meta"], column="score_reg")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match=r"folder .*folder holds no \.parquet file"):
        evaluate(tmp_path / "folder", two_datasets["meta"])


def test_plot_without_matplotlib_says_how_to_install(two_datasets, tmp_path):
    blocker = tmp_path / "blocked" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    env = {**WIDE, "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    result = run_iqa(
        "eval", str(two_datasets["pred"]), "--gt", str(two_datasets["meta"]), "--plot", str(tmp_path / "p.png"),
        env=env,
    )  # fmt: skip
    line = _one_line_error(result)
    assert "pip install matplotlib" in line and "pip install -e '.[plot]'" in line  # iqa-cli is not on PyPI
    assert not (tmp_path / "p.png").exists()


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; /proc refuses new files even to root
        return Path("/proc")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked


@pytest.mark.parametrize(
    ("option", "name", "message"),
    [
        ("--plot", "{locked}/p.png", "--plot {locked}/p.png: cannot write in folder {locked} ("),
        ("--plot", "{tmp}/p.xyz", "--plot {tmp}/p.xyz: matplotlib cannot write .xyz files; use one of"),
        ("--json", "{locked}/m.json", "--json {locked}/m.json: cannot write in folder {locked} ("),
        ("--json", "{tmp}", "--json {tmp}: is a directory; give a file name such as {tmp}/eval.json"),
    ],
    ids=["plot-unwritable", "plot-format", "json-unwritable", "json-dir"],
)
def test_cli_unusable_output_is_refused_before_any_table(two_datasets, tmp_path, iqa, option, name, message):
    names = {"tmp": tmp_path, "locked": _unwritable(tmp_path)}
    code, out, err = iqa("eval", two_datasets["pred"], "--gt", two_datasets["meta"], option, name.format(**names))
    assert code == 2 and out == "", out  # no table printed before the error
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message.format(**names)}"), err
    if "xyz" in name:
        assert ".png, " in err and ".pdf, " in err and ".svg" in err


def test_cli_plot_name_without_suffix_gets_png_and_the_message_names_that_file(two_datasets, tmp_path):
    result = run_iqa("eval", str(two_datasets["pred"]), "--gt", str(two_datasets["meta"]), "--plot",
                     str(tmp_path / "scatter"), env=WIDE)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'scatter.png'}" in result.stderr.splitlines()
    assert not (tmp_path / "scatter").exists()
    assert (tmp_path / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_format_follows_the_suffix(two_datasets, tmp_path, iqa):
    code, _, err = iqa("eval", two_datasets["pred"], "--gt", two_datasets["meta"], "--plot", tmp_path / "s.SVG")
    assert code == 0, err
    assert f"wrote {tmp_path / 's.SVG'}" in err
    assert b"<svg" in (tmp_path / "s.SVG").read_bytes()[:500]


def test_cli_step_fit_is_flagged_and_the_summary_shows_raw_plcc(tmp_path, iqa):
    """Six rows without a monotone relation: the reference recipe's fit is a step (PLCC-log 0.66 against a raw
    -0.10); eval reports it as not converged and shows the raw PLCC, marked, with a note saying why."""
    step_x = [3.347, 2.636, 3.422, 2.921, 3.015, 3.579]
    step_y = [1.37, 3.32, 1.79, 4.23, 2.96, 4.95]
    fine_x = [1.0, 1.6, 2.1, 2.9, 3.4, 4.2]
    names = [f"{d}/{i}.jpg" for d in ("step", "fine") for i in range(6)]
    fine_y = list(3.0 - np.tanh(np.array(fine_x) - 2.6) + np.array([0.05, -0.04, 0.03, -0.02, 0.04, -0.05]))
    pd.DataFrame({"image": names, "dataset": [n.split("/")[0] for n in names], "mos": step_y + fine_y}).to_csv(
        tmp_path / "gt.csv", index=False
    )
    write_predictions(tmp_path / "pred.parquet", names, step_x + fine_x, np.full(12, 0.3))
    code, out, err = iqa("eval", tmp_path / "pred.parquet", "--gt", tmp_path / "gt.csv", "--json", tmp_path / "m.json")
    assert code == 0, err
    rows = {r["dataset"]: r for r in json.loads((tmp_path / "m.json").read_text())["results"]}
    raw = stats.pearsonr(np.float32(step_x).astype(np.float64), step_y).statistic
    assert rows["step"]["logistic_converged"] is False and rows["step"]["logistic_params"] is None
    assert rows["step"]["plcc_logistic"] == pytest.approx(raw, abs=1e-9) == rows["step"]["plcc"]
    assert rows["fine"]["logistic_converged"] is True and rows["fine"]["plcc_logistic"] > 0.99
    step_line = next(line for line in out.splitlines() if line.strip().startswith("step "))
    assert f"{raw:.4f}*" in step_line
    assert "* no usable logistic fit" in out
    assert "note [step]: logistic fit failed (reference start gave a step between predictions" in err
    assert "note [fine]: the fitted logistic is decreasing" in err and "note [step]: the fitted" not in err


# --- what `iqa score` writes: folders of Parquet files, shard keys ----------------------------------------------


@pytest.fixture(scope="module")
def scored_shards(tmp_path_factory):
    """20 synthetic images prepared with `iqa prepare` (names `img0000.png`), the same images as two WebDataset
    shards (keys `img0000`) and as a folder, scored by the tiny model into `--out DIR/` folders."""
    import tarfile

    from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint
    from iqa_cli.synthetic import make_synthetic_iqa

    root = tmp_path_factory.mktemp("eval-score-outputs")
    csv = make_synthetic_iqa(root / "data", 20, size=(30, 24))
    images = sorted((root / "data" / "images").glob("*.png"))
    columns = ["--image-col", "image", "--mos-col", "mos", "--std-col", "std"]
    prepared = run_iqa("prepare", "custom", "--csv", csv, "--images", csv.parent / "images", *columns, "--name",
                       "synth", "--data-dir", root / "meta")  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr
    (root / "shards").mkdir()
    for s, part in enumerate((images[:12], images[12:])):
        with tarfile.open(root / "shards" / f"{s:05d}.tar", "w") as tar:
            for image in part:
                tar.add(image, arcname=image.name)  # key img0000, member img0000.png
    model = write_tiny_checkpoint(root / "model", image_size=28)
    shards = sorted(map(str, (root / "shards").glob("*.tar")))
    for inputs, out in ((shards, "from-shards/"), ([str(csv.parent / "images")], "from-folder/")):
        done = run_iqa("score", *inputs, "--out", f"{root}/{out}", "--model", model, "--workers", "0", "-q")
        assert done.returncode == 0, done.stderr
    return root


def test_eval_reads_a_folder_output_and_joins_shard_keys_with_prepared_names(scored_shards):
    root = scored_shards
    assert sorted(p.name for p in (root / "from-shards").iterdir()) == ["00000.parquet", "00001.parquet", "_iqa.json"]
    written = pd.concat([pd.read_parquet(root / "from-shards" / f) for f in ("00000.parquet", "00001.parquet")])
    assert written["image"].iloc[0] == "img0000"  # a member's key, not its file name
    report = evaluate(root / "from-shards", root / "meta" / "synth.parquet", split="all")
    assert report.counts["predictions"] == 20 and report.counts["scored"] == 20
    assert report.matched_by == {"exact": 0, "image_root": 0, "suffix": 0, "key": 20}
    folder = evaluate(root / "from-folder", root / "meta" / "synth.parquet", split="all")
    assert folder.counts["scored"] == 20 and folder.matched_by["exact"] == 20
    # the same rows either way: the shard keys joined each score with its own image's human score
    by_key = report.matched.set_index(report.matched["image"] + ".png")["pred"].sort_index()
    by_file = folder.matched.set_index("image")["pred"].sort_index()
    assert by_key.index.tolist() == by_file.index.tolist()
    np.testing.assert_allclose(by_key.to_numpy(), by_file.to_numpy(), rtol=1e-6)
    assert report.results[0].metrics.srcc == pytest.approx(folder.results[0].metrics.srcc)


def test_a_key_that_names_two_images_is_refused_in_one_line(scored_shards, tmp_path):
    gt = pd.DataFrame({"image": [f"img{i:04d}.png" for i in range(20)] + ["other/img0003.jpg"], "mos": 3.0})
    gt.to_csv(tmp_path / "gt.csv", index=False)
    result = run_iqa("eval", scored_shards / "from-shards", "--gt", tmp_path / "gt.csv")
    line = _one_line_error(result)
    assert line == (
        "error: prediction key 'img0003' names 2 ground-truth images (img0003.png, other/img0003.jpg): a key joins "
        "the image whose path without its extension ends with it, and must name one; give images unique names "
        "(without their extensions) in the ground truth"
    )


def test_an_unfinished_folder_output_is_read_with_a_note(scored_shards, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(scored_shards / "from-shards", partial)
    (partial / "_iqa.json").unlink()
    (partial / "00001.parquet").unlink()
    report = evaluate(partial, scored_shards / "meta" / "synth.parquet", split="all")
    assert report.counts["predictions"] == 12 and report.counts["missing_predictions"] == 8
    assert report.notes[0] == (
        f"{partial} has no _iqa.json: its run may not have finished; its 1 Parquet file(s) are read as they are"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"holds no \.parquet file"):
        evaluate(empty, scored_shards / "meta" / "synth.parquet")


def test_piped_report_tables_end_no_line_with_spaces(tmp_path):
    """rich pads every cell to the table's width; piped into a file or `diff`, the report's lines end at their
    last character (issue 18: tables without trailing spaces when piped)."""
    names = [f"img{i:02d}.png" for i in range(12)]
    scores = np.linspace(1, 5, 12)
    pd.DataFrame({"image": names, "score": scores, "std": 0.5}).to_parquet(tmp_path / "preds.parquet")
    dataset = ["koniq"] * 6 + ["a-much-longer-dataset-name"] * 6  # a short name in a wide first column
    pd.DataFrame({"image": names, "mos": scores**1.1, "dataset": dataset}).to_csv(tmp_path / "gt.csv", index=False)
    result = run_iqa("eval", "preds.parquet", "--gt", "gt.csv", cwd=tmp_path, env={"COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.lstrip().startswith("koniq ") for line in lines), result.stdout  # the tables are there
    assert [line for line in lines if line != line.rstrip()] == []
