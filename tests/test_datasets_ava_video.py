"""The `ava`, `konvid1k` and `lsvq` presets of `iqa prepare` on files written here in their official layouts: AVA's
mean and std are its vote histogram's, normalized by the 1..10 scale; `--soft-labels histogram` rows sum to 1 and
equal an exact hand computation; the official splits are used; the metas record their task."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest

from iqa_cli.errors import UserError
from iqa_cli.prepare import PrepareConfig, prepare_dataset, read_meta
from tests.conftest import run_iqa


def _ava(folder, rows: int = 40, seed: int = 0, lists: bool = True):
    """AVA.txt lines: index, image ID, 10 vote counts, 2 tags, challenge; the train/test lists beside it."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(210, rng.dirichlet(np.linspace(1, 3, 10) ** rng.uniform(0.5, 2, 10)), size=rows)
    ids = [str(100000 + 7 * i) for i in range(rows)]
    lines = [f"{i + 1} {ids[i]} {' '.join(map(str, counts[i]))} {i % 66} 0 {1000 + i % 5}" for i in range(rows)]
    (folder / "AVA.txt").write_text("\n".join(lines) + "\n")
    if lists:
        (folder / "aesthetics_image_lists").mkdir()
        (folder / "aesthetics_image_lists" / "generic_ls_train.jpgl").write_text("\n".join(ids[:30]) + "\n")
        (folder / "aesthetics_image_lists" / "generic_test.jpgl").write_text("\n".join(ids[30:38]) + "\n")
    return ids, counts


def hand_label(counts: np.ndarray, k: int) -> list[Fraction]:
    """Each rating r's votes spread evenly over [r - 1/2, r + 1/2] of the 1..10 axis; level i covers the stretch of
    that axis that maps to [c_i - d/2, c_i + d/2] of 1..5 (the outer levels open-ended); exact fractions."""
    d = Fraction(4, k - 1)
    to_ratings = Fraction(9, 4)  # 1..5 -> 1..10
    edges = [1 + (1 + i * d - d / 2 - 1) * to_ratings for i in range(k)] + [None]
    label = []
    for i in range(k):
        low = edges[i] if i > 0 else Fraction(-(10**9))
        high = edges[i + 1] if i < k - 1 else Fraction(10**9)
        mass = Fraction(0)
        for r, c in enumerate(counts.tolist(), start=1):
            inside = max(Fraction(0), min(high, Fraction(2 * r + 1, 2)) - max(low, Fraction(2 * r - 1, 2)))
            mass += c * inside
        label.append(mass / int(counts.sum()))
    return label


def test_ava_mean_std_and_histogram_labels(tmp_path):
    ids, counts = _ava(tmp_path)
    out = tmp_path / "ava.parquet"
    result = run_iqa("prepare", "ava", "--csv", str(tmp_path), "--out", str(out), "--soft-labels", "histogram")
    assert result.returncode == 0, result.stderr
    assert "ava: 38 rows (train 30, test 8)" in result.stdout and "measured vote histograms" in result.stdout
    assert "2 image(s) in neither official list; dropped" in result.stderr
    frame, meta = read_meta(out)
    assert (
        meta["task"] == "aesthetics" and meta["soft_labels"] == "histogram" and meta["split_source"] == "official (ava)"
    )
    ratings = np.arange(1, 11)
    for row in frame.itertuples():
        i = ids.index(row.image.removesuffix(".jpg"))
        mean = np.average(ratings, weights=counts[i])
        std = np.sqrt(np.average((ratings - mean) ** 2, weights=counts[i]))
        assert row.mos == pytest.approx(mean, abs=1e-12) and row.std == pytest.approx(std, abs=1e-12)
        assert row.mos_norm == pytest.approx(1 + 4 * (mean - 1) / 9, abs=1e-12)
        assert row.std_norm == pytest.approx(4 * std / 9, abs=1e-12)
        assert row.split == ("train" if i < 30 else "test")
        np.testing.assert_allclose(row.soft_label, [float(f) for f in hand_label(counts[i], 5)], rtol=0, atol=1e-7)
        assert sum(row.soft_label) == pytest.approx(1, abs=1e-6) and not row.fallback
    assert meta["mos_min"] == 1.0 and meta["mos_max"] == 10.0  # the scale, not the data's min/max


def test_ten_levels_give_the_histogram_itself_and_the_gaussian_default_stays(tmp_path):
    ids, counts = _ava(tmp_path, rows=12, seed=3, lists=False)
    ten = prepare_dataset(
        PrepareConfig("ava", tmp_path, out=tmp_path / "ten.parquet", levels=10, soft_labels="histogram")
    )
    frame, _ = read_meta(ten.out)
    for row in frame.itertuples():
        own = counts[ids.index(row.image.removesuffix(".jpg"))]
        np.testing.assert_allclose(row.soft_label, own / own.sum(), rtol=0, atol=1e-7)
    gaussian = prepare_dataset(PrepareConfig("ava", tmp_path, out=tmp_path / "g.parquet"))
    assert read_meta(gaussian.out)[1]["soft_labels"] == "gaussian" and "seeded" in gaussian.summary["split"]["source"]
    with pytest.raises(UserError, match="koniq publishes no vote histograms"):
        koniq = tmp_path / "koniq10k_scores_and_distributions.csv"
        koniq.write_text("image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,MOS_zscore\na.jpg,1,2,3,4,5,15,3.6,1.2,60\n")
        prepare_dataset(PrepareConfig("koniq", koniq, out=tmp_path / "k.parquet", soft_labels="histogram"))
    with pytest.raises(UserError, match="koniq publishes no vote histograms"):  # said before the file is looked for
        prepare_dataset(PrepareConfig("koniq", tmp_path / "absent.csv", soft_labels="histogram"))


def test_konvid1k_and_lsvq_name_their_videos_and_splits(tmp_path):
    (tmp_path / "KoNViD_1k_mos.csv").write_text(
        "flickr_id,mos\n" + "".join(f"{3000 + i},{1 + 0.1 * i}\n" for i in range(20))
    )
    konvid = prepare_dataset(PrepareConfig("konvid1k", tmp_path, out=tmp_path / "konvid.parquet"))
    frame, meta = read_meta(konvid.out)
    assert sorted(frame["image"])[:2] == ["3000.mp4", "3001.mp4"] and meta["task"] == "quality"
    assert frame["std"].isna().all() and "seeded" in meta["split_source"]
    (tmp_path / "KoNViD_1k_attributes.csv").write_text(
        "flickr_id,file_name,MOS,SD\n"
        + "".join(f"{3000 + i},x_{i}.mp4,{1 + 0.1 * i},0.{i % 9 + 1}\n" for i in range(9))
    )
    attributes = prepare_dataset(
        PrepareConfig("konvid1k", tmp_path / "KoNViD_1k_attributes.csv", out=tmp_path / "attr.parquet")
    )
    assert read_meta(attributes.out)[0]["std"].notna().all()

    header = "name,p1,p2,p3,height,width,mos_p1,mos_p2,mos_p3,mos,frame_number,is_test\n"
    rows = "".join(f"yfcc-batch1/{100 + i},0,0,0,540,960,50,50,50,{40 + i},240,{'True' if i % 4 == 0 else 'False'}\n"
                   for i in range(16))  # fmt: skip
    (tmp_path / "labels_train_test.csv").write_text(header + rows)
    lsvq = prepare_dataset(PrepareConfig("lsvq", tmp_path, out=tmp_path / "lsvq.parquet"))
    frame, meta = read_meta(lsvq.out)
    assert meta["split_source"] == "official (lsvq)"
    assert dict(zip(frame["image"], frame["split"], strict=True))["yfcc-batch1/104.mp4"] == "test"
    assert (frame["split"] == "test").sum() == 4 and "height" in frame.columns and "is_test" not in frame.columns
    (tmp_path / "labels_test_1080p.csv").write_text("name,height,width,mos,frame_number\na/1,1080,1920,55,300\n"
                                                    "a/2,1080,1920,62,300\n")  # fmt: skip
    hd = prepare_dataset(
        PrepareConfig("lsvq", tmp_path / "labels_test_1080p.csv", out=tmp_path / "hd.parquet", name="lsvq1080p")
    )
    assert set(read_meta(hd.out)[0]["split"]) == {"test"}
    table = pq.read_table(lsvq.out)
    assert json.loads(table.schema.metadata[b"level_names"]) == ["bad", "poor", "fair", "good", "excellent"]


@pytest.mark.parametrize(
    ("dataset", "file", "header", "fragment"),
    [
        ("konvid1k", "KoNViD_1k_mos.csv", "video,mos\n1,2.5\n", "KoNViD-1k's score files have columns flickr_id"),
        ("lsvq", "labels_train_test.csv", "name,score\na,50\n", "LSVQ's label files have columns name and mos"),
    ],
)
def test_a_video_score_file_without_its_columns_is_one_line_naming_them(tmp_path, dataset, file, header, fragment):
    (tmp_path / file).write_text(header)
    result = run_iqa("prepare", dataset, "--csv", str(tmp_path / file), "--out", str(tmp_path / "m.parquet"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert fragment in result.stderr and str(tmp_path / file) in result.stderr
    assert f"(columns found: {header.split(chr(10))[0].replace(',', ', ')})" in result.stderr
    assert not (tmp_path / "m.parquet").exists()
