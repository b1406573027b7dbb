"""`iqa score --fast-decode`: JPEGs decoded at the smallest DCT scale whose padded square the model's resize still
shrinks; opt-in, recorded in the output, never mixed with exact decoding in one output, scores close to exact."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, JpegImagePlugin

from iqa_cli.errors import UserError
from iqa_cli.images import load_image
from iqa_cli.models.mplug_owl2.preprocess import ClipPreprocessor
from iqa_cli.scoring.config import ScoreConfig
from iqa_cli.scoring.driver import score_images
from tests.conftest import run_iqa
from tests.test_score_pipeline import Crash, CrashingScorer, FakeScorer


def _jpeg(path, width, height, seed=0, **save):
    """Smooth colour fields plus noise, like `benchmarks/bench_score.make_jpegs`."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), 3)
    pixels = np.clip(np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (height, width, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90, **save)
    return path


@pytest.mark.parametrize(
    ("size", "decoded"),
    [((1024, 768), (512, 384)), ((768, 1024), (384, 512)), ((1800, 1350), (450, 338)), ((896, 600), (448, 300)),
     ((895, 600), (895, 600)), ((300, 200), (300, 200)), ((3600, 50), (450, 7))],
)  # fmt: skip
def test_the_smallest_dct_scale_that_keeps_the_models_side(tmp_path, size, decoded):
    pre = ClipPreprocessor()  # 448 px
    path = _jpeg(tmp_path / "a.jpg", *size)
    image = load_image(path, draft=pre.draft_size)
    assert image.size == decoded and image.mode == "RGB"
    assert max(decoded) >= 448 or decoded == size  # the padded square is still shrunk, never enlarged
    assert image.info.get("decoded_from", image.size) == size
    exact, fast = pre.uint8_pixels(load_image(path)), pre.uint8_pixels(image)
    difference = np.abs(exact.astype(int) - fast)
    assert difference.mean() < 3 and (decoded != size or difference.max() == 0)


def test_a_rotated_jpeg_reports_its_upright_full_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1024x768, upright 768x1024
    path = _jpeg(tmp_path / "r.jpg", 1024, 768, exif=exif)
    image = load_image(path, draft=ClipPreprocessor().draft_size)
    assert image.size == (384, 512) and image.info["decoded_from"] == (768, 1024)
    assert load_image(path).size == (768, 1024)


def test_other_formats_decode_as_before(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png", draft=ClipPreprocessor().draft_size)
    assert "decoded_from" not in image.info
    assert np.array_equal(np.asarray(image), np.asarray(load_image(tmp_path / "a.png")))


@pytest.fixture
def jpegs(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        _jpeg(folder / f"{i}.jpg", 320 + 16 * i, 240, seed=i)
    Image.new("RGB", (40, 30), (1, 2, 3)).save(folder / "small.png")
    return folder


def _drafts(monkeypatch) -> list:
    calls = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def counting(self, mode, size):
        calls.append(size)
        return draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", counting)
    return calls


def test_used_only_when_asked_and_recorded_in_the_output(jpegs, tmp_path, monkeypatch):
    calls = _drafts(monkeypatch)  # workers=0: decoding in this process, where the spy is
    exact, fast = tmp_path / "exact.parquet", tmp_path / "fast.parquet"
    for out, fast_decode in ((exact, False), (fast, True)):
        config = ScoreConfig(out=out, inputs=[str(jpegs)], batch_size=4, workers=0, quiet=True, fast_decode=fast_decode)
        score_images(config, scorer_factory=lambda device: FakeScorer(device))
        assert len(calls) == (6 if fast_decode else 0)
        metadata = pq.read_schema(out).metadata
        assert metadata[b"decode"] == (b"fast" if fast_decode else b"exact")
        assert json.loads(metadata[b"request"])["decode"] == metadata[b"decode"].decode()
    a, b = pq.read_table(exact).to_pandas(), pq.read_table(fast).to_pandas()
    assert (a["width"] == b["width"]).all() and (a["height"] == b["height"]).all()  # full sizes in both
    assert (a["score"] != b["score"]).any()  # other pixels (the fake model reads them all)


def test_every_source_reports_the_full_size_and_the_same_scores(jpegs, tmp_path):
    """The same JPEGs as files, in a WebDataset shard and in a Parquet column, under --fast-decode: width and height
    are the stored size (not the DCT-scaled one the model saw), and the scores are the files' scores."""
    import io
    import tarfile

    import pyarrow as pa

    names = sorted(p.name for p in jpegs.iterdir())
    with tarfile.open(tmp_path / "photos.tar", "w") as tar:
        for name in names:
            data = (jpegs / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    column = pa.array([{"bytes": (jpegs / n).read_bytes(), "path": n} for n in names])
    pq.write_table(pa.table({"image": column}), tmp_path / "photos.parquet", row_group_size=4)
    frames = {}
    for kind, inputs in {
        "files": jpegs,
        "shard": tmp_path / "photos.tar",
        "parquet": tmp_path / "photos.parquet",
    }.items():
        out = tmp_path / f"{kind}.parquet"
        config = ScoreConfig(out=out, inputs=[str(inputs)], batch_size=3, workers=1, quiet=True, fast_decode=True)
        score_images(config, scorer_factory=lambda device: FakeScorer(device))
        frames[kind] = pq.read_table(out).to_pandas()
    sizes = [Image.open(jpegs / n).size for n in names]
    for kind, frame in frames.items():
        assert list(zip(frame["width"], frame["height"], strict=True)) == sizes, kind
        assert frame["score"].tolist() == frames["files"]["score"].tolist(), kind
    assert sizes[0] == (320, 240)  # drafted to 40x30 for the fake model's 24 px input


def test_resume_and_finished_outputs_refuse_the_other_mode(jpegs, tmp_path):
    out = tmp_path / "scores.parquet"
    config = ScoreConfig(out=out, inputs=[str(jpegs)], batch_size=2, workers=0, quiet=True, flush_rows=1)
    with pytest.raises(Crash):
        score_images(config, scorer_factory=lambda device: CrashingScorer(device, crash_after=1))
    config.fast_decode = True
    refusal = r"holds an interrupted run of another decode mode \(exact, now fast;.*resume it with no --fast-decode"
    with pytest.raises(UserError, match=refusal):
        score_images(config, scorer_factory=lambda device: FakeScorer(device))
    config.fast_decode = False
    score_images(config, scorer_factory=lambda device: FakeScorer(device))  # resumes in its own mode
    config.fast_decode = True
    with pytest.raises(UserError, match=r"exists and was written with another decode mode .*--overwrite"):
        score_images(config, scorer_factory=lambda device: FakeScorer(device))
    config.overwrite = True
    score_images(config, scorer_factory=lambda device: FakeScorer(device))
    assert pq.read_schema(out).metadata[b"decode"] == b"fast"


@pytest.mark.slow
def test_cli_scores_stay_within_the_stated_tolerance(tmp_path):
    """The tiny model at 448 px in the real 32x32 patch grid, the CLI both ways: scores within 0.05 on the 1-5
    scale (README; measured 0.010 at most on 64 such photos), and not equal (the mode changed the pixels)."""
    from benchmarks.bench_score import tiny_checkpoint

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(8):
        _jpeg(folder / f"{i}.jpg", 1024, 768, seed=10 + i)
    ckpt = tiny_checkpoint(tmp_path, 448, 14)
    common = ["--model", str(ckpt.path), "--device", "cpu", "--dtype", "float32", "-q"]
    scores = {}
    for mode in ("exact", "fast"):
        out = tmp_path / f"{mode}.parquet"
        result = run_iqa("score", str(folder), "--out", str(out), *common, *(["--fast-decode"] * (mode == "fast")))
        assert result.returncode == 0, result.stderr
        scores[mode] = pq.read_table(out).column("score").to_numpy()
    difference = np.abs(scores["exact"] - scores["fast"])
    assert 0 < difference.max() <= 0.05
    again = run_iqa("score", str(folder), "--out", str(tmp_path / "exact.parquet"), *common, "--fast-decode")
    assert again.returncode == 2 and "another decode mode" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and "Traceback" not in again.stderr


def test_shards_decode_like_files_in_fast_mode(jpegs, tmp_path, monkeypatch):
    """The shard/Parquet loader takes the same `--fast-decode` loader as files: equal scores, other than exact."""
    import io
    import tarfile

    calls = _drafts(monkeypatch)
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for path in sorted(jpegs.glob("*.jpg")):
            data = path.read_bytes()
            info = tarfile.TarInfo(path.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    frames = {}
    for name, inputs, fast in (("files", jpegs, True), ("shard", shard, True), ("exact", shard, False)):
        out = tmp_path / f"{name}.parquet"
        config = ScoreConfig(out=out, inputs=[str(inputs)], batch_size=3, workers=0, quiet=True, fast_decode=fast)
        score_images(config, scorer_factory=lambda device: FakeScorer(device))
        frame = pq.read_table(out).to_pandas()
        frames[name] = frame[frame["image"].str.endswith(".jpg") | ~frame["image"].str.contains(r"\.")]
    assert len(calls) == 12  # six JPEGs drafted as files, six as shard members; none in exact mode
    files = frames["files"].set_index(frames["files"]["image"].str.removesuffix(".jpg"))["score"]
    shard_scores = frames["shard"].set_index("image")["score"]
    assert len(shard_scores) == 6 and (files.loc[shard_scores.index] == shard_scores).all()
    assert (frames["exact"].set_index("image")["score"] != shard_scores).any()


@pytest.mark.parametrize(
    "size", [(1024, 768), (768, 1024), (513, 385), (385, 513), (448, 448), (1, 1), (4000, 200), (60, 40)]
)
@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
def test_the_fast_resize_is_within_one_grey_level_of_pillows(size, resample):
    """`--fast-decode` resizes with torch's vectorized uint8 filter: the same padded square, center crop and sizes
    as the exact path, values at most 1 apart, and only a small share of them differ."""
    rng = np.random.default_rng(sum(size))
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noisy = np.clip(np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255)
    image = Image.fromarray(noisy.astype(np.uint8))
    pre = ClipPreprocessor(resample=resample)
    exact, fast = pre.uint8_pixels(image), pre.uint8_pixels(image, fast=True)
    assert fast.shape == exact.shape == (448, 448, 3) and fast.dtype == np.uint8 and fast.flags.writeable
    difference = np.abs(fast.astype(np.int16) - exact)
    assert difference.max() <= 1
    assert (difference > 0).mean() < 0.02
    if size[0] > size[1]:  # the padding rows far from the image are the mean colour in both
        assert (fast[:5] == pre.pad_color).all()


def test_the_fast_resize_is_only_in_the_fast_transform():
    from iqa_cli.models.mplug_owl2.backbone import ClipTransform

    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    transform = ClipTransform(ClipPreprocessor())
    exact = transform(image)["pixel_values"].numpy()
    assert np.array_equal(exact, ClipPreprocessor().uint8_pixels(image))
    fast = transform.fast_variant()(image)["pixel_values"].numpy()
    assert np.array_equal(fast, ClipPreprocessor().uint8_pixels(image, fast=True)) and not np.array_equal(fast, exact)
    assert not transform.fast  # the scorer's own transform is untouched
