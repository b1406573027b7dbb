"""`iqa prepare`: splits, image checks, outputs, and every kind of bad input (exit 2, one line naming it).

Most cases call the console-script entry point `iqa_cli.cli.main` in this process (the `iqa` fixture of
tests/test_datasets.py: the same code path as the installed `iqa`, a second faster per call than a
subprocess); one runs the real subprocess.
"""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from iqa_cli.prepare import read_meta
from tests.conftest import run_iqa
from tests.test_datasets import (
    check_prepared,
    write_agiqa3k,
    write_csiq,
    write_flive,
    write_kadid,
    write_koniq,
    write_livew,
    write_pipal,
    write_spaq,
    write_tid2013,
)


@pytest.fixture
def rng(seeded):
    return np.random.default_rng(seeded)


def assert_user_error(result, *needles):
    code, out, err = result
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def summary_of(result):
    code, out, err = result
    assert code == 0, err
    return json.loads(out)


# ---- splits ------------------------------------------------------------------------------------------------


def test_deqa_split_json_assigns_named_images_and_drops_the_rest(iqa, tmp_path, rng):
    source, expected = write_koniq(tmp_path, rng)
    names = expected["image"].tolist()
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": names[:25], "test": names[25:35]}))
    out = tmp_path / "k.parquet"
    result = iqa("prepare", "koniq", "--csv", source, "--split", split, "--out", out, "--json")
    summary = summary_of(result)
    assert "5 image(s) not named in the split file" in result[2]
    assert summary["split"]["train"] == 25 and summary["split"]["test"] == 10
    assert summary["dropped"]["not_in_split"] == 5
    frame = pq.read_table(out).to_pandas()
    assert frame["split"].tolist() == ["train"] * 25 + ["test"] * 10
    # min/max come from the whole metadata file (as the reference), not from the rows kept
    assert summary["mos_min"] == expected["mos"].min() and summary["mos_max"] == expected["mos"].max()


def test_split_csv_matches_file_names_of_nested_paths(iqa, tmp_path, rng):
    source, expected = write_livew(tmp_path, rng)
    rows = ["image,split"] + [
        f"{p.rsplit('/', 1)[-1]},{'test' if i % 3 == 0 else 'train'}" for i, p in enumerate(expected["image"])
    ]
    split = tmp_path / "split.csv"
    split.write_text("\n".join(rows) + "\n")
    summary = summary_of(
        iqa("prepare", "livew", "--csv", source, "--split", split, "--out", tmp_path / "l.parquet", "--json")
    )
    frame = pq.read_table(tmp_path / "l.parquet").to_pandas()
    assert frame["image"].tolist()[:2] == ["trainingImages/t1.bmp", "trainingImages/t2.bmp"]
    assert frame["split"].tolist() == ["test" if i % 3 == 0 else "train" for i in range(len(frame))]
    assert summary["split"]["test"] == 10


def test_seeded_split_is_reproducible_and_groups_by_reference(iqa, tmp_path, rng):
    source, expected = write_kadid(tmp_path, rng)
    splits = {}
    for seed in (1, 1, 2):
        out = tmp_path / f"k{seed}.parquet"
        summary_of(
            iqa("prepare", "kadid", "--csv", source, "--out", out, "--seed", seed, "--test-frac", 0.25, "--json")
        )
        splits.setdefault(seed, []).append(pq.read_table(out).column("split").to_pylist())
    assert splits[1][0] == splits[1][1] and splits[1][0] != splits[2][0]
    frame = pd.DataFrame({"split": splits[1][0], "ref": expected["ref"]})
    assert (frame.groupby("ref")["split"].nunique() == 1).all()
    assert (frame.groupby("ref")["split"].first() == "test").sum() == 2  # 25% of 8 references
    all_train = summary_of(
        iqa("prepare", "kadid", "--csv", source, "--out", tmp_path / "a.parquet", "--test-frac", 0, "--json")
    )
    assert all_train["split"] == {"source": "seeded (test_frac=0, seed=0)", "train": 40, "test": 0}


# ---- image checks -------------------------------------------------------------------------------------------


def test_images_found_where_named_moved_or_case_changed_and_missing_reported(iqa, tmp_path, rng):
    source, expected = write_tid2013(tmp_path, rng)
    images = tmp_path / "tid" / "distorted_images"
    images.mkdir(parents=True)
    names = expected["image"].tolist()
    for name in names[:-2]:
        (images / name.upper().replace(".BMP", ".bmp")).write_bytes(b"")  # I01_01_1.bmp on disk
    code, out, err = iqa(
        "prepare", "tid2013", "--csv", source, "--images", tmp_path / "tid", "--out", tmp_path / "t.parquet", "--json"
    )
    summary = json.loads(out)
    assert code == 0
    root = str((tmp_path / "tid").resolve())
    assert summary["images"] == {
        "root": root,
        "found": len(names) - 2,
        "found_by_name": len(names) - 2,
        "missing": 2,
    }
    # --help: "missing images are dropped unless --strict"
    assert f"2 of {len(names)} image(s) not found" in err and repr(names[-2]) in err and repr(names[-1]) in err
    assert "rows are dropped" in err and summary["rows"] == len(names) - 2
    assert summary["dropped"]["missing_image"] == 2
    frame, meta = read_meta(tmp_path / "t.parquet")
    assert frame["image"].iloc[0] == "distorted_images/" + names[0].upper().replace(".BMP", ".bmp")
    assert names[-1] not in set(frame["image"]) and len(frame) == len(names) - 2
    assert meta["image_root"] == root
    strict = iqa(
        "prepare", "tid2013", "--csv", source, "--images", tmp_path / "tid", "--out", tmp_path / "u.parquet", "--strict"
    )
    assert_user_error(strict, "2 of 30 image(s) not found", names[-2])
    assert not (tmp_path / "u.parquet").exists()


def test_many_missing_images_are_counted_and_a_few_named_and_none_found_is_an_error(iqa, tmp_path, rng):
    source, expected = write_koniq(tmp_path, rng, n=40)
    images = tmp_path / "imgs"
    images.mkdir()
    names = expected["image"].tolist()
    for name in names[:30]:
        (images / name).write_bytes(b"")
    code, _out, err = iqa("prepare", "koniq", "--csv", source, "--images", images, "--out", tmp_path / "k.parquet")
    assert code == 0, err
    line = next(x for x in err.splitlines() if "not found" in x)
    assert "10 of 40 image(s) not found" in line and all(repr(n) in line for n in names[30:33])
    assert repr(names[33]) not in line and line.count("', '") == 2  # three named, then "..."
    frame, meta = read_meta(tmp_path / "k.parquet")
    assert frame["image"].tolist() == names[:30]
    assert meta["level_names"] == ["bad", "poor", "fair", "good", "excellent"]  # not the missing names' list
    # the labels of the kept rows are those of the whole file (the range comes from every MOS)
    full = summary_of(iqa("prepare", "koniq", "--csv", source, "--out", tmp_path / "all.parquet", "--json"))
    every, _ = read_meta(tmp_path / "all.parquet")
    assert full["rows"] == 40
    np.testing.assert_array_equal(np.stack(frame["soft_label"]), np.stack(every["soft_label"])[:30])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(
        iqa("prepare", "koniq", "--csv", source, "--images", empty, "--out", tmp_path / "e.parquet"),
        "none of the 40 images found under",
        repr(names[0]),
    )


def test_image_root_is_stored_absolute_and_train_finds_images_from_another_directory(tmp_path, rng):
    from iqa_cli.training import data as train_data

    source, expected = write_koniq(tmp_path, rng, n=12)
    (tmp_path / "imgs").mkdir()
    for name in expected["image"]:
        (tmp_path / "imgs" / name).write_bytes(b"")
    proc = run_iqa("prepare", "koniq", "--csv", source.name, "--images", "imgs", "--out", "k.parquet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    _, meta = read_meta(tmp_path / "k.parquet")
    assert meta["image_root"] == str((tmp_path / "imgs").resolve())
    other = tmp_path / "elsewhere"
    other.mkdir()
    loaded = train_data.load_train_data([str(tmp_path / "k.parquet")], other)  # checks every file exists
    assert len(loaded.train) + len(loaded.test) == 12 and not loaded.notes


def test_csiq_workbook_paths_resolve_under_dst_imgs(iqa, tmp_path, rng):
    _source, expected = write_csiq(tmp_path, rng)
    root = tmp_path / "dst_imgs"
    for path in expected["image"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")
    summary = summary_of(
        iqa(
            "prepare",
            "csiq",
            "--csv",
            tmp_path,
            "--images",
            root,
            "--out",
            tmp_path / "c.parquet",
            "--strict",
            "--json",
        )
    )
    assert summary["images"]["missing"] == 0 and summary["images"]["found_by_name"] == 0


# ---- options and outputs --------------------------------------------------------------------------------------


def test_levels_names_density_and_thresholds_reach_the_file(iqa, tmp_path, rng):
    source, _expected = write_agiqa3k(tmp_path, rng)
    out = tmp_path / "a.parquet"
    names = ",".join(f"q{i}" for i in range(12))
    summary = summary_of(
        iqa(
            "prepare",
            "agiqa3k",
            "--csv",
            source,
            "--out",
            out,
            "--levels",
            12,
            "--level-names",
            names,
            "--density",
            "pdf",
            "--std-threshold",
            0.3,
            "--mean-threshold",
            0.05,
            "--json",
        )
    )
    frame, meta = read_meta(out)
    assert meta["level_names"] == [f"q{i}" for i in range(12)] == summary["level_names"]
    assert meta["levels"] == 12 and meta["density"] == "pdf"
    assert meta["std_threshold"] == 0.3 and meta["mean_threshold"] == 0.05
    assert len(frame["soft_label"].iloc[0]) == 12
    assert summary["labels"]["fallback"] == int(frame["fallback"].sum())


def test_label_rule_renormalized_reaches_labels_and_metadata(iqa, tmp_path, rng):
    from tests.test_labels import row_soft_label

    source, _ = write_koniq(tmp_path, rng, n=200)
    for rule in ("reference", "renormalized"):
        out = tmp_path / f"{rule}.parquet"
        args = ("prepare", "koniq", "--csv", source, "--out", out, "--json")
        summary = summary_of(iqa(*args) if rule == "reference" else iqa(*args, "--label-rule", rule))
        _frame, meta = read_meta(out)
        assert meta["label_rule"] == summary["label_rule"] == rule
    ref, _ = read_meta(tmp_path / "reference.parquet")
    new, _ = read_meta(tmp_path / "renormalized.parquet")
    want = [row_soft_label(m, s, 5, "pdf")[0] for m, s in zip(new["mos_norm"], new["std_norm"], strict=True)]
    np.testing.assert_allclose(np.stack(new["soft_label"].to_numpy()), want, rtol=0, atol=1e-6)
    differ = np.abs(np.stack(new["soft_label"].to_numpy()) - np.stack(ref["soft_label"].to_numpy())).max(axis=1)
    assert (differ > 1e-3).any()  # the two rules are not the same labels
    # a meta written before the rule was recorded was made with the old default, renormalized
    table = pq.read_table(tmp_path / "reference.parquet")
    metadata = {k: v for k, v in table.schema.metadata.items() if k != b"label_rule"}
    pq.write_table(table.replace_schema_metadata(metadata), tmp_path / "old.parquet")
    assert read_meta(tmp_path / "old.parquet")[1]["label_rule"] == "renormalized"


def test_pseudo_std_override_and_missing_std(iqa, tmp_path, rng):
    source, _expected = write_pipal(tmp_path, rng)
    summary = summary_of(
        iqa("prepare", "pipal", "--csv", source, "--out", tmp_path / "p.parquet", "--pseudo-std", 0.1, "--json")
    )
    frame, meta = read_meta(tmp_path / "p.parquet")
    np.testing.assert_allclose(frame["std_norm"], 0.4)
    assert meta["pseudo_std"] == 0.1 and summary["pseudo_std"] == 0.1
    flive, _ = write_flive(tmp_path, rng)
    code, _out, err = iqa("prepare", "flive", "--csv", flive, "--out", tmp_path / "f.parquet", "--json")
    assert code == 0 and "has no std" in err
    frame, _ = read_meta(tmp_path / "f.parquet")
    assert frame["std"].isna().all() and frame["fallback"].all()


def test_rich_summary_and_default_location(iqa, tmp_path, rng, monkeypatch):
    source, _expected = write_koniq(tmp_path, rng)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IQA_DATA_DIR", raising=False)
    code, out, err = iqa("prepare", "koniq", "--csv", source, "--name", "koniq-small")
    assert code == 0, err
    assert (tmp_path / "iqa-data" / "koniq-small.parquet").exists()
    assert "koniq-small: 40 rows" in out and "Wasserstein" in out and "fallback" in out
    frame, meta = read_meta(tmp_path / "iqa-data" / "koniq-small.parquet")
    assert (frame["dataset"] == "koniq-small").all() and meta["preset"] == "koniq"


def test_output_is_replaced_atomically_and_kept_on_failure(iqa, tmp_path, rng):
    source, _expected = write_koniq(tmp_path, rng)
    out = tmp_path / "data" / "koniq.parquet"
    summary_of(iqa("prepare", "koniq", "--csv", source, "--out", out, "--json"))
    before = out.read_bytes()
    summary_of(iqa("prepare", "koniq", "--csv", source, "--out", out, "--seed", 5, "--json"))
    assert out.read_bytes() != before and sorted(p.name for p in out.parent.iterdir()) == ["koniq.parquet"]
    kept = out.read_bytes()
    assert_user_error(iqa("prepare", "koniq", "--csv", source, "--out", out, "--levels", 13), "--levels")
    assert out.read_bytes() == kept


# ---- bad input ------------------------------------------------------------------------------------------------


def test_missing_file_and_unknown_dataset(iqa, tmp_path):
    assert_user_error(iqa("prepare", "koniq", "--csv", tmp_path / "nope.csv"), "not found", "nope.csv")
    assert_user_error(
        iqa("prepare", "koniq", "--csv", tmp_path), "koniq10k_scores_and_distributions.csv", str(tmp_path)
    )
    line = assert_user_error(
        iqa("prepare", "konik", "--csv", tmp_path), "unknown dataset preset 'konik' (did you mean koniq?"
    )
    for name in ("koniq", "spaq", "kadid", "pipal", "livew", "agiqa3k", "tid2013", "csiq", "flive", "custom"):
        assert name in line


def test_misnamed_column_lists_the_columns_found(iqa, tmp_path, rng):
    source, _ = write_koniq(tmp_path, rng)
    source.write_text(source.read_text().replace('"SD"', '"StdDev"', 1))
    assert_user_error(
        iqa("prepare", "koniq", "--csv", source), "missing column 'SD'", "columns found: image_name", "StdDev"
    )


def test_non_numeric_and_missing_mos_dropped_with_count_or_strict_error(iqa, tmp_path, rng):
    source, expected = write_agiqa3k(tmp_path, rng)
    frame = pd.read_csv(source)
    frame["mos_quality"] = frame["mos_quality"].astype(object)
    frame.loc[3, "mos_quality"] = "abc"
    frame.loc[7, "mos_quality"] = np.nan
    frame.to_csv(source, index=False)
    code, out, err = iqa("prepare", "agiqa3k", "--csv", source, "--out", tmp_path / "a.parquet", "--json")
    assert code == 0 and "2 row(s) with a non-numeric or missing MOS in column 'mos_quality'" in err and "'abc'" in err
    summary = json.loads(out)
    assert summary["rows"] == 28 and summary["dropped"]["invalid_mos"] == 2
    keep = np.ones(30, dtype=bool)
    keep[[3, 7]] = False
    check_prepared(tmp_path / "a.parquet", summary, expected[keep].reset_index(drop=True), lower=False, density="cdf")
    strict = iqa("prepare", "agiqa3k", "--csv", source, "--out", tmp_path / "b.parquet", "--strict")
    assert_user_error(strict, str(source), "'mos_quality'", "'abc'", expected["image"][3])


def test_literal_nan_is_not_a_number_and_an_empty_cell_is_empty(iqa, tmp_path, rng):
    source, expected = write_koniq(tmp_path, rng)
    frame = pd.read_csv(source)
    frame["MOS"], frame["SD"] = frame["MOS"].astype(object), frame["SD"].astype(object)
    frame.loc[4, "MOS"] = "NaN"
    frame.loc[9, "MOS"] = None
    frame.loc[6, "SD"] = "nan"
    frame.to_csv(source, index=False)
    code, _out, err = iqa("prepare", "koniq", "--csv", source, "--out", tmp_path / "k.parquet")
    assert code == 0, err
    assert (
        f"{source}: 2 row(s) with a non-numeric or missing MOS in column 'MOS', e.g. 'NaN' (not a number) in data "
        f"row 5 for image {expected['image'][4]!r}; dropped"
    ) in err
    assert "'nan' (not a number) in data row 7" in err and "column 'SD'" in err
    line = assert_user_error(iqa("prepare", "koniq", "--csv", source, "--strict"), str(source), "'MOS'", "data row 5")
    assert "'NaN' (not a number)" in line and "empty cell" not in line
    frame.loc[4, "MOS"] = 2.5
    frame.loc[6, "SD"] = 0.4
    frame.to_csv(source, index=False)
    assert_user_error(iqa("prepare", "koniq", "--csv", source, "--strict"), "an empty cell in data row 10")


def test_a_mos_far_outside_the_others_is_named_with_the_range_it_causes(iqa, tmp_path, rng):
    source, expected = write_koniq(tmp_path, rng, n=60)
    frame = pd.read_csv(source)
    frame.loc[17, "MOS"] = -2.0
    frame.to_csv(source, index=False)
    code, out, err = iqa("prepare", "koniq", "--csv", source, "--out", tmp_path / "k.parquet", "--json")
    assert code == 0, err
    line = next(x for x in err.splitlines() if "far outside" in x)
    assert f"-2 (data row 18, image {expected['image'][17]!r})" in line and "column 'MOS'" in line
    rest = np.delete(expected["mos"].to_numpy(), 17)
    assert f"normalization range to [-2, {rest.max():g}]" in line and f"({rest.min():g}..{rest.max():g})" in line
    assert json.loads(out)["rows"] == 60  # a warning: the row is kept
    frame.loc[17, "MOS"] = 9.5  # and above the others
    frame.to_csv(source, index=False)
    _, _, err = iqa("prepare", "koniq", "--csv", source, "--out", tmp_path / "k.parquet")
    assert "9.5 (data row 18" in err


@pytest.mark.parametrize("kind", ["koniq", "kadid", "spaq", "tid2013", "pipal", "livew", "agiqa3k", "flive"])
def test_outlier_rule_stays_quiet_on_realistic_score_distributions(kind, tmp_path, rng):
    from iqa_cli.prepare import _mos_outliers

    # shapes of the public datasets' MOS (bounded scales, dense, some skewed with a long tail), 10k rows
    n = 10_000
    samples = {
        "koniq": np.clip(rng.normal(3.0, 0.55, n), 1.1, 4.4),
        "kadid": rng.uniform(1.0, 4.9, n),
        "spaq": np.clip(rng.normal(50, 18, n), 2, 98),
        "tid2013": np.clip(rng.normal(4.4, 1.2, n), 0.24, 7.2),
        "pipal": rng.normal(1450, 130, n),
        "livew": np.clip(rng.normal(55, 19, n), 3, 93),
        "agiqa3k": 5 * rng.beta(2, 2.5, n),
        "flive": np.clip(100 - rng.gamma(2.0, 14.0, n), 0, 100),  # long left tail
    }
    low, high = _mos_outliers(samples[kind])
    assert low.size == 0 and high.size == 0


def test_negative_std_and_negative_variance(iqa, tmp_path, rng):
    source, expected = write_agiqa3k(tmp_path, rng)
    source.write_text(source.read_text().replace(f",{expected['std'][4]},", ",-0.25,", 1))
    assert_user_error(
        iqa("prepare", "agiqa3k", "--csv", source), "negative std -0.25", "'std_quality'", expected["image"][4]
    )
    kadid, kexp = write_kadid(tmp_path, rng)
    frame = pd.read_csv(kadid)
    frame.loc[2, "var"] = -0.5
    frame.to_csv(kadid, index=False)
    assert_user_error(iqa("prepare", "kadid", "--csv", kadid), "negative variance -0.5", "'var'", kexp["image"][2])


def test_split_file_naming_unknown_images(iqa, tmp_path, rng):
    source, expected = write_koniq(tmp_path, rng)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": expected["image"].tolist()[:5], "test": ["ghost.jpg"]}))
    assert_user_error(
        iqa("prepare", "koniq", "--csv", source, "--split", split), str(split), "1 image(s) not in", "'ghost.jpg'"
    )
    split.write_text(json.dumps({"train": ["a"], "holdout": ["b"]}))
    assert_user_error(iqa("prepare", "koniq", "--csv", source, "--split", split), "unknown split 'holdout'")
    both = tmp_path / "split.csv"
    name = expected["image"][0]
    both.write_text(f"image,split\n{name},train\n{name},test\n")
    assert_user_error(iqa("prepare", "koniq", "--csv", source, "--split", both), repr(name), "in both")


def test_empty_dataset_and_constant_scores(iqa, tmp_path, rng):
    source, _ = write_koniq(tmp_path, rng)
    header = source.read_text().splitlines()[0]
    source.write_text(header + "\n")
    assert_user_error(iqa("prepare", "koniq", "--csv", source), str(source), "no rows")
    flive = tmp_path / "labels_image.csv"
    flive.write_text("name,mos\na.jpg,50\nb.jpg,50\n")
    assert_user_error(iqa("prepare", "flive", "--csv", flive), "all 2 MOS values equal 50")
    flive.write_text("name,mos\na.jpg,x\nb.jpg,\n")
    assert_user_error(iqa("prepare", "flive", "--csv", flive), "no row has a usable image name, MOS and std")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--levels", 1], ["--levels must be from 2 to 12, got 1"]),
        (["--levels", 13], ["--levels must be from 2 to 12, got 13"]),
        (["--levels", 4], ["4 levels need 4 level names"]),  # the default names are the common five only for K=5
        (["--level-names", "bad,good"], ["5 levels need 5 level names, got 2: bad,good"]),
        (["--density", "gauss"], ["--density must be one of cdf, pdf, got 'gauss'"]),
        (["--test-frac", 1.5], ["--test-frac must be from 0 to 1, got 1.5"]),
        (["--std-threshold", -1], ["--std-threshold must be a number >= 0, got -1"]),
        (["--pseudo-std", 0], ["--pseudo-std must be a fraction > 0"]),
        (["--image-col", "x"], ["--image-col only apply to the custom dataset"]),
        (["--label-rule", "paper"], ["--label-rule must be one of reference, renormalized, got 'paper'"]),
    ],
)
def test_bad_flags(iqa, tmp_path, rng, args, needles):
    source, _ = write_koniq(tmp_path, rng)
    if args == ["--levels", 4]:
        args = ["--levels", 4, "--level-names", "quality"]
        needles = ["level name set 'quality' has 5 names; it does not fit 4 levels"]
    assert_user_error(iqa("prepare", "koniq", "--csv", source, *args), *needles)


def test_xlsx_without_the_needed_sheet_or_columns(iqa, tmp_path, rng):
    source, _ = write_csiq(tmp_path, rng, sheet="dmos_by_image")
    assert_user_error(
        iqa("prepare", "csiq", "--csv", source),
        str(source),
        "no sheet 'all_by_image'",
        "all_by_distortion, dmos_by_image",
    )
    spaq, _ = write_spaq(tmp_path, rng)
    frame = pd.read_excel(spaq).rename(columns={"MOS": "Score"})
    frame.to_excel(spaq, sheet_name="Scores", index=False)
    assert_user_error(
        iqa("prepare", "spaq", "--csv", spaq), "no sheet has the columns 'Image name' and 'MOS'", "sheets: Scores"
    )


def test_livew_mat_files_missing_or_disagreeing(iqa, tmp_path, rng):
    source, _ = write_livew(tmp_path, rng)
    (tmp_path / "Data" / "AllStdDev_release.mat").unlink()
    assert_user_error(iqa("prepare", "livew", "--csv", source), "AllStdDev_release.mat", "not found")
    from scipy import io

    io.savemat(tmp_path / "Data" / "AllStdDev_release.mat", {"AllStdDev_release": np.ones((1, 5))})
    assert_user_error(iqa("prepare", "livew", "--csv", tmp_path / "Data"), "disagree in length", "30 names", "5 std")
    io.savemat(tmp_path / "Data" / "AllStdDev_release.mat", {"StdDev": np.ones((1, 30))})
    assert_user_error(iqa("prepare", "livew", "--csv", tmp_path), "no variable 'AllStdDev_release'", "StdDev")


def test_custom_needs_its_columns(iqa, tmp_path):
    table = tmp_path / "scores.csv"
    table.write_text("file,score\na.png,1\nb.png,3\nc.png,2\n")
    assert_user_error(iqa("prepare", "custom", "--csv", table), "needs --image-col and --mos-col")
    assert_user_error(
        iqa("prepare", "custom", "--csv", table, "--image-col", "file", "--mos-col", "mos"),
        "missing column 'mos'", "columns found: file, score",
    )  # fmt: skip
    summary = summary_of(
        iqa(
            "prepare",
            "custom",
            "--csv",
            table,
            "--image-col",
            "file",
            "--mos-col",
            "score",
            "--out",
            tmp_path / "c.parquet",
            "--json",
        )
    )
    assert summary["rows"] == 3 and summary["labels"]["std_rows"] == 0


def test_user_error_from_the_real_process_is_one_line_with_exit_code_2(tmp_path):
    result = run_iqa("prepare", "koniq", "--csv", str(tmp_path / "missing" / ("long-name-" * 8 + ".csv")))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: KonIQ-10k score file not found: {tmp_path / 'missing' / ('long-name-' * 8 + '.csv')}"
    ]
    assert result.stdout == ""


def test_byte_order_mark_and_duplicate_names(iqa, tmp_path, rng):
    source, expected = write_koniq(tmp_path, rng)
    lines = source.read_text().splitlines()
    source.write_bytes(("\ufeff" + "\n".join([*lines, lines[1]]) + "\n").encode())  # BOM, first row twice
    code, out, err = iqa("prepare", "koniq", "--csv", source, "--out", tmp_path / "k.parquet", "--json")
    assert code == 0, err
    assert f"1 duplicate image name(s), e.g. {expected['image'][0]!r}" in err
    assert json.loads(out)["rows"] == 41


# ---- the fast paths give what the straightforward code gave -------------------------------------------------


def reference_seeded_split(frame, test_frac, seed):
    """The seeded split as first written (pd.unique, a Python set of the test groups, isin): the reference."""
    groups = frame["ref"].fillna(frame["image"]) if "ref" in frame else frame["image"]
    unique = pd.unique(groups)
    order = np.random.default_rng(seed).permutation(len(unique))
    test = set(unique[order[: round(test_frac * len(unique))]])
    return groups.isin(test).to_numpy()


def split_frames(rng):
    """Tables as the readers give them: by reference image, with missing references, duplicate names, text
    that differs only in case or spaces, integer references, object and string columns."""
    n = 600
    refs = rng.integers(0, 37, n)
    images = [f"d/{i % 450}.png" for i in rng.permutation(n)]  # 150 names twice
    by_ref = pd.DataFrame({"image": images, "ref": [f"r{r}.png" for r in refs]})
    some_missing = by_ref.assign(ref=by_ref["ref"].where(rng.random(n) > 0.3))
    cased = pd.DataFrame({"image": [["a.png", "A.png", "a.png ", "b.png"][i % 4] + str(i % 7) for i in range(n)]})
    return {
        "by_ref": by_ref,
        "ref_missing": some_missing,
        "ref_object": some_missing.astype(object),
        "ref_int": pd.DataFrame({"image": images, "ref": refs}),
        "images_duplicated": by_ref[["image"]],
        "images_object": by_ref[["image"]].astype(object),
        "case_and_spaces": cased,
        "one_row": by_ref.iloc[:1],
    }


def test_seeded_split_is_the_reference_split_for_every_seed_and_fraction(rng):
    from iqa_cli.prepare import group_codes, seeded_test_rows

    for name, frame in split_frames(rng).items():
        image_groups = group_codes(frame["image"])
        for seed in range(25):
            for test_frac in (0.2, 1 / 3, 0.0, 1.0, float(rng.random())):
                expected = reference_seeded_split(frame, test_frac, seed)
                got = seeded_test_rows(frame, test_frac, seed)
                assert np.array_equal(got, expected), (name, seed, test_frac)
                assert np.array_equal(seeded_test_rows(frame, test_frac, seed, image_groups), expected)
        if len(frame) > 1:
            assert 0 < reference_seeded_split(frame, 0.5, 0).sum() < len(frame)  # both splits occur


def test_split_written_by_prepare_is_the_reference_split(iqa, tmp_path, rng):
    source, expected = write_kadid(tmp_path, rng, n_ref=30, per_ref=4)
    names = [f"x/{i % 70}.png" for i in range(120)]  # duplicates, no reference column
    custom = tmp_path / "custom.csv"
    pd.DataFrame({"name": names, "score": rng.uniform(1, 5, 120)}).to_csv(custom, index=False)
    frames = {"kadid": expected, "custom": pd.DataFrame({"image": names})}
    for seed in (0, 3, 11):
        for kind, args in (("kadid", ["kadid", "--csv", source]), ("custom", ["custom", "--csv", custom])):
            if kind == "custom":
                args = [*args, "--image-col", "name", "--mos-col", "score"]
            out = tmp_path / f"{kind}{seed}.parquet"
            summary_of(iqa("prepare", *args, "--out", out, "--seed", seed, "--test-frac", 0.3, "--json"))
            written = np.array(pq.read_table(out).column("split").to_pylist()) == "test"
            assert np.array_equal(written, reference_seeded_split(frames[kind], 0.3, seed)), (kind, seed)


def test_duplicate_count_and_first_repeat_equal_pandas_duplicated(rng):
    from iqa_cli.prepare import first_repeat, group_codes

    for _ in range(200):
        n = int(rng.integers(1, 60))
        names = pd.Series([f"i{v}" for v in rng.integers(0, max(1, n + int(rng.integers(-n, 5))), n)])
        codes, groups = group_codes(names)
        repeated = names.duplicated()
        assert n - groups == repeated.sum()
        first = first_repeat(codes)
        assert (first is None) == (not repeated.any())
        if first is not None:
            assert first == int(np.flatnonzero(repeated.to_numpy())[0])


def reference_mos_outliers(mos):
    """_mos_outliers as first written, on a stable sort of every row: the reference."""
    from iqa_cli.prepare import OUTLIER_GAP

    n = mos.size
    if n < 4:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    order = np.argsort(mos, kind="stable")
    ordered = mos[order]
    q1, q3 = np.percentile(ordered, [25, 75])
    if not q3 - q1 > 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    m = max(1, n // 100)
    gaps = np.diff(ordered) > OUTLIER_GAP * (q3 - q1)
    low_cut, high_cut = np.flatnonzero(gaps[:m]), np.flatnonzero(gaps[n - 1 - m :])
    low = order[: low_cut[-1] + 1] if low_cut.size else order[:0]
    high = order[n - m + high_cut[0] :] if high_cut.size else order[:0]
    return low, high


def test_outliers_from_a_partial_sort_equal_the_full_stable_sort(rng):
    from iqa_cli.prepare import _mos_outliers

    flagged = 0
    for trial in range(600):
        n = int(rng.integers(1, 30)) if trial % 3 == 0 else int(rng.integers(30, 2500))
        # ties everywhere (integer ratings, rounded scores) test the row order among equal extremes
        mos = rng.integers(0, 6, n).astype(float) if trial % 2 else rng.normal(0, 1, n).round(trial % 3)
        for _ in range(int(rng.integers(0, 4))):
            mos[rng.integers(0, n)] = rng.choice([-50.0, -7.0, 9.0, 50.0])
        expected, got = reference_mos_outliers(mos), _mos_outliers(mos)
        assert all(np.array_equal(e, g) for e, g in zip(expected, got, strict=True)), trial
        flagged += bool(expected[0].size or expected[1].size)
    assert flagged > 100  # the cases above do flag rows
