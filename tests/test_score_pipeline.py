"""The scoring pipeline with a fake scorer: rows and errors, batch independence, resume, kill -9, torchrun.

The fake scorer is a deterministic function of each image's own pixels (mean intensity -> level logits ->
softmax), computed row by row in float64, so any dependence on batch size, padding or the other images in a
batch shows up as a difference. Decoding and preprocessing are the real `iqa_cli.images` code.

Run as a module (`python -m tests.test_score_pipeline run ...`), this file scores a folder with the fake
scorer: the kill -9 and the two-process torchrun tests launch it that way.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from iqa_cli import distributed
from iqa_cli.errors import UserError
from iqa_cli.images import load_image
from iqa_cli.model_options import ModelSpec
from iqa_cli.models.mplug_owl2.backbone import ClipTransform, SquareCollate
from iqa_cli.models.mplug_owl2.preprocess import ClipPreprocessor
from iqa_cli.scoring.config import ScoreConfig
from iqa_cli.scoring.driver import score_images
from iqa_cli.scoring.loader import Decoder, PadCollate, UnitStream
from iqa_cli.scoring.runner import BatchRunner, settle_size
from iqa_cli.scoring.store import sidecar_path
from iqa_cli.sources import SourceOptions, open_inputs
from tests.conftest import REPO_ROOT, fixed_unit_size, kill_when

LEVELS = ["bad", "poor", "fair", "good", "excellent"]
SIZE = 24  # side of the fake model's input


@dataclass
class FakeBatch:
    probs: torch.Tensor
    score: torch.Tensor
    std: torch.Tensor
    score_reg: torch.Tensor | None


def fake_numbers(pixels: np.ndarray, k: int) -> tuple[np.ndarray, float, float, float]:
    """float64 per image: mean pixel -> Gaussian-shaped logits over K levels -> (probs, score, std, reg)."""
    centers = 1 + 4 * np.arange(k) / (k - 1)
    m = float(pixels.astype(np.float64).mean())
    target = 3 + 2.5 * np.tanh(m)  # normalized CLIP pixels lie around [-1.8, 2.1]
    logits = -((target - centers) ** 2) * 1.5
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    score = float(probs @ centers)
    std = float(np.sqrt(probs @ (centers - score) ** 2))
    return probs, score, std, 5 * m


class FakeScorer:
    """The Scorer contract with a row-wise, batch-independent fake model."""

    def __init__(self, device="cpu", *, delay=0.0, model="fake/deqa", levels=LEVELS, regressor=False, calls=None):
        self.device = torch.device(device)
        self.preprocessor = ClipPreprocessor(size=SIZE, crop_size=(SIZE, SIZE))
        self.transform, self.collate = ClipTransform(self.preprocessor), SquareCollate(SIZE, self.preprocessor)
        self.level_names = list(levels)
        self.has_regressor = regressor
        self.delay = delay
        self.calls = calls
        self.metadata = {
            "model": model,
            "revision": "0" * 40,
            "dtype": "float32",
            "prompt": "USER: <|image|> ASSISTANT: The quality of the image is",
            "level_names": json.dumps(self.level_names),
        }

    def score_batch(self, visual: dict[str, torch.Tensor]) -> FakeBatch:
        return self.score_pixels(visual["pixel_values"])

    def score_pixels(self, pixel_values: torch.Tensor) -> FakeBatch:
        if self.calls is not None:
            self.calls.append(pixel_values.shape[0])
        if self.delay:
            time.sleep(self.delay)
        rows = [fake_numbers(row.numpy(), len(self.level_names)) for row in pixel_values.cpu()]
        return FakeBatch(
            probs=torch.tensor(np.stack([r[0] for r in rows]), dtype=torch.float32),
            score=torch.tensor([r[1] for r in rows], dtype=torch.float32),
            std=torch.tensor([r[2] for r in rows], dtype=torch.float32),
            score_reg=torch.tensor([r[3] for r in rows], dtype=torch.float32) if self.has_regressor else None,
        )


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb for the decoder's limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_image_folder(root: Path) -> dict[str, str | None]:
    """Writes images of many formats/modes and broken files; returns {name: expected error fragment}."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}

    def rgb(w, h, level):
        return Image.fromarray(np.clip(rng.normal(level, 40, (h, w, 3)), 0, 255).astype(np.uint8))

    def save(name, image, **kwargs):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **kwargs)
        expected[name] = None

    save("a.png", rgb(40, 30, 30))
    save("b.jpg", rgb(30, 40, 200), quality=90)
    save("c.webp", rgb(33, 33, 120))
    save("d.bmp", rgb(20, 50, 90))
    save("e.tiff", rgb(50, 20, 160))
    save("UPPER.JPEG", rgb(35, 25, 70))
    save("nested/deeper/f.png", rgb(25, 25, 220))
    save("ünïcödé 写真.png", rgb(30, 30, 140))
    save("modes/rgba.png", Image.fromarray(rng.integers(0, 255, (30, 20, 4), dtype=np.uint8), "RGBA"))
    save("modes/gray.png", Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), "L"))
    save("modes/palette.gif", rgb(24, 24, 100).convert("P"))
    save("modes/sixteen.png", Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)))
    save("modes/cmyk.jpg", rgb(26, 22, 180).convert("CMYK"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 -> stored 40x20, upright 20x40
    save("modes/rotated.jpg", rgb(40, 20, 60), exif=exif)
    for i in range(6):
        save(f"many/{i:02d}.png", rgb(16 + i, 16, 20 + 40 * i))

    (root / "broken").mkdir()
    (root / "broken/zero.jpg").write_bytes(b"")
    expected["broken/zero.jpg"] = "empty"
    good = root / "b.jpg"
    (root / "broken/truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    expected["broken/truncated.jpg"] = "decode"
    (root / "broken/random.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    expected["broken/random.png"] = "not an image"
    (root / "broken/text.jpg").write_text("this is not a JPEG\n")
    expected["broken/text.jpg"] = "not an image"
    (root / "broken/bomb.png").write_bytes(_png_header_only(40_000, 40_000))
    expected["broken/bomb.png"] = "decompression bomb"
    (root / "notes.txt").write_text("not an input")
    (root / ".hidden.png").write_bytes(good.read_bytes())
    return expected


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path_factory.mktemp("images") / "photos"
    return root, make_image_folder(root)


def run(folder: Path, out: Path, scorer_kwargs=None, **options):
    kwargs = {"batch_size": 4, "workers": 2, "quiet": True, **options}
    config = ScoreConfig(out=out, inputs=[str(folder)], **kwargs)
    return score_images(config, scorer_factory=lambda device: FakeScorer(device, **(scorer_kwargs or {})))


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> pd.DataFrame:
    """A clean single-process run to compare every other run with."""
    out = tmp_path_factory.mktemp("reference") / "scores.parquet"
    run(folder[0], out, batch_size=5, workers=1)
    return pd.read_parquet(out)


def assert_same_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    for column in a.columns:
        if column == "probs":
            for x, y in zip(a[column], b[column], strict=True):
                assert (x is None and y is None) or np.array_equal(x, y)
        else:
            pd.testing.assert_series_equal(a[column], b[column])


def test_one_row_per_file_with_errors_and_independent_scores(folder, tmp_path):
    root, expected = folder
    out = tmp_path / "scores.parquet"
    summary = run(root, out)
    table = pq.read_table(out)
    frame = table.to_pandas()

    assert frame["image"].tolist() == sorted(expected, key=lambda n: n.split("/"))
    assert summary.total == len(expected) and summary.failed == 5 and summary.processed == len(expected)
    assert not sidecar_path(out).exists()

    types = {f.name: f.type for f in table.schema}
    assert list(types) == ["image", "score", "std", "probs", "level", "width", "height", "error"]
    assert types["probs"].value_type == pa.float32() and pa.types.is_list(types["probs"])
    assert [types[c] for c in ("image", "score", "std", "level", "width", "height", "error")] == [
        pa.string(),
        pa.float32(),
        pa.float32(),
        pa.string(),
        pa.int32(),
        pa.int32(),
        pa.string(),
    ]
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["model"] == "fake/deqa" and json.loads(meta["level_names"]) == LEVELS
    assert meta["iqa_version"] and meta["num_inputs"] == str(len(expected))

    preprocess = ClipPreprocessor(size=SIZE, crop_size=(SIZE, SIZE))
    for row in frame.itertuples():
        fragment = expected[row.image]
        if fragment is not None:
            assert fragment in row.error, (row.image, row.error)
            assert pd.isna(row.score) and pd.isna(row.std) and row.probs is None and pd.isna(row.level)
            continue
        assert pd.isna(row.error)
        image = load_image(root / row.image)
        assert (row.width, row.height) == image.size
        probs, score, std, _ = fake_numbers(preprocess.pixels(image), len(LEVELS))
        np.testing.assert_allclose(row.probs, probs, rtol=0, atol=1e-6)
        assert row.score == pytest.approx(score, abs=1e-5) and row.std == pytest.approx(std, abs=1e-5)
        assert row.level == LEVELS[int(np.argmax(probs))]
    assert frame.set_index("image").loc["modes/rotated.jpg", ["width", "height"]].tolist() == [20, 40]
    assert len(set(frame["score"].dropna().round(4))) > 10  # the fake model really varies


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 0), (3, 2), (64, 1)])
def test_results_do_not_depend_on_batch_size_or_workers(folder, reference, tmp_path, batch_size, workers):
    out = tmp_path / "scores.parquet"
    run(folder[0], out, batch_size=batch_size, workers=workers)
    assert_same_rows(pd.read_parquet(out), reference)


def test_padding_keeps_every_model_call_one_shape(folder, tmp_path):
    calls: list[int] = []
    run(folder[0], tmp_path / "s.parquet", batch_size=8, workers=0, scorer_kwargs={"calls": calls})
    assert set(calls) == {8} and len(calls) == -(-len(folder[1]) // 8)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_csv_and_jsonl_hold_the_same_rows(folder, reference, tmp_path, fmt):
    out = tmp_path / f"scores.{fmt}"
    run(folder[0], out)
    if fmt == "csv":
        frame = pd.read_csv(out, keep_default_na=False, na_values=[""])
    else:
        frame = pd.read_json(out, lines=True, dtype=False)
    assert list(frame.columns) == list(reference.columns)
    assert frame["image"].tolist() == reference["image"].tolist()
    ok = reference["error"].isna().to_numpy()
    np.testing.assert_array_equal(frame["score"].to_numpy(np.float32)[ok], reference["score"].to_numpy(np.float32)[ok])
    assert frame["score"][~ok].isna().all()
    probs = [json.loads(p) if isinstance(p, str) else p for p in frame["probs"][ok]]
    np.testing.assert_array_equal(np.array(probs, dtype=np.float32), np.stack(reference["probs"][ok]))
    assert frame["error"][ok].isna().all() and frame["error"][~ok].tolist() == reference["error"][~ok].tolist()
    assert frame["width"][ok].tolist() == reference["width"][ok].tolist()
    meta = json.loads((tmp_path / f"scores.{fmt}.meta.json").read_text())
    assert meta["model"] == "fake/deqa"


class Crash(Exception):
    pass


class CrashingScorer(FakeScorer):
    def __init__(self, *args, crash_after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_after = crash_after
        self.n = 0

    def score_pixels(self, pixel_values):
        self.n += 1
        if self.n > self.crash_after:
            raise Crash
        return super().score_pixels(pixel_values)


def _saved_rows(out: Path) -> int:
    """Rows an interrupted run left in its sidecar: finished units and pieces of unfinished ones."""
    return sum(pq.read_metadata(p).num_rows for p in sidecar_path(out).glob("unit-*.parquet"))


def test_resume_after_a_crash_scores_only_the_rest(folder, reference, tmp_path):
    out = tmp_path / "scores.parquet"
    config = ScoreConfig(out=out, inputs=[str(folder[0])], batch_size=2, workers=1, quiet=True, flush_rows=3)
    with pytest.raises(Crash):
        score_images(config, scorer_factory=lambda d: CrashingScorer(d, crash_after=5))
    assert not out.exists()
    # 5 model calls of 2 rows, and 2 batches of broken files that need no call: pieces of >= 3 rows as it went,
    # the rest on the way out
    assert _saved_rows(out) == 14

    calls: list[int] = []
    summary = score_images(config, scorer_factory=lambda d: FakeScorer(d, calls=calls))
    assert summary.resumed == 14 and summary.processed == len(reference) - 14
    assert sum(calls) == 2 * -(-(len(reference) - 14) // 2)
    assert_same_rows(pd.read_parquet(out), reference)
    assert not sidecar_path(out).exists()


def test_overwrite_discards_an_interrupted_run_of_the_same_request(tmp_path):
    """--overwrite replaces an interrupted run, as its help says: images regenerated under the same names after a
    crash are all scored again, none kept from the sidecar."""
    folder, out = tmp_path / "photos", tmp_path / "scores.parquet"
    folder.mkdir()

    def images(level: int) -> None:
        for i in range(8):
            Image.new("RGB", (20, 16), (level + 10 * i, 90, 40)).save(folder / f"{i}.png")

    images(0)
    config = ScoreConfig(out=out, inputs=[str(folder)], batch_size=2, workers=0, quiet=True, flush_rows=2)
    with pytest.raises(Crash):
        score_images(config, scorer_factory=lambda d: CrashingScorer(d, crash_after=2))
    assert _saved_rows(out) == 4
    images(120)  # new pictures, the same names: the same list of inputs
    summary = score_images(replace(config, overwrite=True), scorer_factory=FakeScorer)
    assert summary.resumed == 0 and summary.processed == 8
    fresh = ScoreConfig(out=tmp_path / "fresh.parquet", inputs=[str(folder)], quiet=True)
    score_images(fresh, scorer_factory=FakeScorer)
    assert_same_rows(pd.read_parquet(out), pd.read_parquet(tmp_path / "fresh.parquet"))


@pytest.mark.parametrize(
    ("then", "now", "what", "match"),
    [
        ({"video": {"fps": 1.0, "max_frames": 32, "per_frame": True}},
         {"video": {"fps": 1.0, "max_frames": 32, "per_frame": False}},
         "another video sampling (--per-frame, now no --per-frame)", "--per-frame"),
        ({"video": {"frames": 8, "per_frame": False}}, {"video": {"fps": 2.0, "max_frames": 32, "per_frame": False}},
         "another video sampling (--frames 8, now --fps 2.0 --max-frames 32)", "--frames 8"),
        ({"task": "aesthetic"}, {}, "another task ('aesthetic', now the model's own)", "--task aesthetic"),
        ({}, {"task": "aesthetic"}, "another task (the model's own, now 'aesthetic')", "no --task"),
    ],
)  # fmt: skip
def test_a_refused_resume_names_the_flags_that_differ_as_the_cli_takes_them(then, now, what, match):
    """What to pass to resume is flags the CLI parses: a boolean is the bare flag (or `no --x`), never
    `--per-frame False`, and the options that agree are left out."""
    from iqa_cli.scoring.plan import describe_difference

    recorded = {"request": then, "inputs_fingerprint": "f"}
    found = describe_difference(recorded, fingerprint="f", inputs=1, noun="files", request=now, scorer=None)
    assert (found.what, found.match) == (what, match)


def test_crash_before_the_output_is_assembled_resumes_without_the_model(folder, reference, tmp_path, monkeypatch):
    import iqa_cli.scoring.driver

    out = tmp_path / "scores.parquet"

    def killed_mid_assembly(out_path, fmt, unit_files, schema, metadata):
        next(iter(unit_files))
        out_path.with_name(f".{out_path.name}.99999.tmp").write_bytes(b"half a file")
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(iqa_cli.scoring.driver, "assemble_file", killed_mid_assembly)
        with pytest.raises(Crash):
            run(folder[0], out)
    assert not out.exists() and _saved_rows(out) == len(reference)

    def refuse(device):
        raise AssertionError("every image is in the parts: the model must not be loaded")

    summary = score_images(ScoreConfig(out=out, inputs=[str(folder[0])], quiet=True), scorer_factory=refuse)
    assert summary.resumed == len(reference) and summary.processed == 0 and summary.failed == 5
    assert_same_rows(pd.read_parquet(out), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]  # no sidecar, no stale temporary


def test_finished_output_is_not_recomputed_unless_overwrite(folder, reference, tmp_path):
    out = tmp_path / "scores.parquet"
    run(folder[0], out)
    before = out.stat().st_mtime_ns

    def refuse(device):
        raise AssertionError("the model must not be loaded for a finished output")

    summary = score_images(ScoreConfig(out=out, inputs=[str(folder[0])], quiet=True), scorer_factory=refuse)
    assert summary.already_complete and out.stat().st_mtime_ns == before
    # Same model reached through different request options: compared by the scorer's metadata, still done.
    summary = run(folder[0], out, model=ModelSpec(dtype="float32"))
    assert summary.already_complete
    summary = run(folder[0], out, overwrite=True)
    assert not summary.already_complete and summary.processed == len(reference)
    assert_same_rows(pd.read_parquet(out), reference)


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"model": "other/model"}, r"another model \(fake/deqa, now other/model\)"),
        ({"levels": ["one", "two", "three"]}, r"other level names \(bad, poor, fair, good, excellent, now one, two, "),
    ],
)
def test_output_or_sidecar_of_another_model_is_refused(folder, tmp_path, changed, message):
    out = tmp_path / "scores.parquet"
    run(folder[0], out)
    with pytest.raises(UserError, match=rf"exists and was written with {message}.*--overwrite"):
        run(folder[0], out, model="someone/x", scorer_kwargs=changed)
    summary = run(folder[0], out, model="someone/x", overwrite=True, scorer_kwargs=changed)
    assert summary.processed == summary.total

    out2 = tmp_path / "interrupted.parquet"
    config = ScoreConfig(out=out2, inputs=[str(folder[0])], batch_size=2, workers=0, quiet=True, flush_rows=1)
    with pytest.raises(Crash):
        score_images(config, scorer_factory=lambda d: CrashingScorer(d, crash_after=2))
    with pytest.raises(UserError, match=rf"interrupted\.parquet\.parts holds an interrupted run of {message}"):
        run(folder[0], out2, model="someone/x", scorer_kwargs=changed)
    run(folder[0], out2, model="someone/x", overwrite=True, scorer_kwargs=changed)
    assert pq.read_metadata(out2).num_rows == summary.total


def test_changed_inputs_are_refused(folder, tmp_path):
    root = tmp_path / "few"
    make_image_folder(root)
    out = tmp_path / "scores.parquet"
    run(root, out)
    Image.new("RGB", (8, 8)).save(root / "new.png")
    with pytest.raises(UserError, match=r"another list of inputs \(25 images then, 26 now\)"):
        run(root, out)


def test_bad_options_are_user_errors(folder, tmp_path):
    for options, message in [
        ({"batch_size": 0}, "--batch-size 0"),
        ({"batch_size": -3}, "--batch-size -3"),
        ({"batch_size": "many"}, "--batch-size many"),
        ({"format": "xlsx"}, "--format xlsx: unknown format"),
        ({"workers": -1}, "--workers -1"),
        ({"model": ModelSpec(dtype="int8")}, "--dtype int8"),
        ({"model": ModelSpec(quantize="int3")}, "--quantize int3"),
        ({"model": ModelSpec(family={"min_pixels": 9, "max_pixels": 4})}, "--min-pixels 9 is above --max-pixels 4"),
        ({"model": ModelSpec(family={"no_such": 1})}, "--no-such: no model family takes this option"),
    ]:
        with pytest.raises(UserError, match=message):
            run(folder[0], tmp_path / "s.parquet", **options)
    (tmp_path / "s.parquet").write_text("someone else's file")
    with pytest.raises(UserError, match="not written by `iqa score`"):
        run(folder[0], tmp_path / "s.parquet")


def test_a_run_in_progress_is_named_before_inputs_are_listed_or_the_model_loads(tmp_path):
    from tests.test_run_lock import _holder

    out = tmp_path / "scores.parquet"
    holder = _holder(sidecar_path(out) / ".iqa-lock")

    def refuse(device):
        raise AssertionError("the model must not load while another run holds --out")

    try:
        config = ScoreConfig(out=out, inputs=[str(tmp_path / "no-such-folder")], quiet=True)
        with pytest.raises(UserError, match=rf"is in use by another iqa test run \(pid {holder.pid} on host"):
            score_images(config, scorer_factory=refuse)
    finally:
        holder.communicate("go\n", timeout=30)


def test_wait_resumes_an_interrupted_run_once_its_holder_lets_go(folder, reference, tmp_path):
    from tests.test_run_lock import _holder

    out = tmp_path / "scores.parquet"
    config = ScoreConfig(out=out, inputs=[str(folder[0])], batch_size=2, workers=0, quiet=True, flush_rows=2)
    with pytest.raises(Crash):
        score_images(config, scorer_factory=lambda d: CrashingScorer(d, crash_after=3))
    done = _saved_rows(out)
    holder = _holder(sidecar_path(out) / ".iqa-lock")
    released: list[float] = []

    def release_later() -> None:
        time.sleep(1.0)
        released.append(time.monotonic())
        holder.communicate("go\n", timeout=30)

    thread = threading.Thread(target=release_later)
    thread.start()
    config.wait = True
    summary = score_images(config, scorer_factory=lambda d: FakeScorer(d))
    finished = time.monotonic()
    thread.join()
    assert released and finished > released[0]  # it went on only after the holder let go
    assert summary.resumed == done == 10 and summary.processed == len(reference) - done  # 3 calls, 2 without
    assert_same_rows(pd.read_parquet(out), reference)
    assert not sidecar_path(out).exists()


def test_auto_batch_size_halves_on_out_of_memory():
    class Picky(FakeScorer):
        def score_pixels(self, pixel_values):
            if pixel_values.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super().score_pixels(pixel_values)

    pixels = torch.randn(8, 3, SIZE, SIZE)
    runner = BatchRunner(Picky(), 8, auto=True)
    result = runner({"pixel_values": pixels})
    assert runner.size == 2
    expected = FakeScorer().score_pixels(pixels)
    np.testing.assert_array_equal(result.score, expected.score.numpy())
    with pytest.raises(torch.OutOfMemoryError):
        BatchRunner(Picky(), 8, auto=False)({"pixel_values": pixels})
    assert settle_size(Picky(), 16, torch.float32) == 2  # found with blank rows, before any image is scored


def test_out_of_memory_while_padding_a_chunk_halves_too(monkeypatch):
    import iqa_cli.scoring.runner as runner_module

    padded = runner_module.rows_padded

    def tight(rows, size):
        if size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return padded(rows, size)

    monkeypatch.setattr(runner_module, "rows_padded", tight)
    pixels = torch.randn(5, 3, SIZE, SIZE)
    runner = BatchRunner(FakeScorer(), 4, auto=True)
    np.testing.assert_array_equal(runner({"pixel_values": pixels}).score, FakeScorer().score_pixels(pixels).score)
    assert runner.size == 2


def test_distributed_environment_and_sharding(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.env() == distributed.DistEnv() and not distributed.env().is_distributed
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.all_gather_object(3) == [3]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    environment = distributed.env()
    assert (environment.rank, environment.world_size, environment.local_rank) == (5, 4, 1)
    assert distributed.resolve_device("cpu", environment) == torch.device("cpu")
    # Strided shards cover every item exactly once, whatever the world size.
    for world in (1, 2, 3, 8):
        shards = [np.arange(10)[distributed.shard(10, distributed.DistEnv(r, world))] for r in range(world)]
        assert sorted(np.concatenate(shards).tolist()) == list(range(10))
    assert distributed.shard(10, distributed.DistEnv(1, 3)) == slice(1, 10, 3)


@pytest.mark.gpu
def test_cuda_pipeline_with_pinned_prefetch_equals_cpu(folder, reference, tmp_path):
    out = tmp_path / "scores.parquet"
    run(folder[0], out, device="cuda", batch_size=3, workers=2)
    assert_same_rows(pd.read_parquet(out), reference)


def _launch(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs
    )


@pytest.mark.parametrize("per_unit", [64, 4])  # the whole folder one unit; 7 units of 4 images
def test_sigkill_midway_then_rerun_gives_each_image_once(folder, reference, tmp_path, monkeypatch, per_unit):
    out = tmp_path / "scores.parquet"
    args = ["-m", "tests.test_score_pipeline", "run", str(folder[0]), str(out), "--delay", "0.3", "--flush-rows", "2"]
    process = _launch([*args, "--per-unit", str(per_unit)])
    # pieces of 2 rows as the unit goes (and finished units)
    kill_when(process, lambda: _saved_rows(out) >= 6, "nothing was written")
    assert process.returncode == -signal.SIGKILL and not out.exists()
    done = _saved_rows(out)
    assert 6 <= done < len(reference)
    pieces = list(sidecar_path(out).glob("unit-*.from-*.parquet"))
    assert pieces or per_unit == 4  # one unit: only pieces stand for the work done

    fixed_unit_size(monkeypatch, per_unit)
    calls: list[int] = []
    summary = run(folder[0], out, batch_size=2, workers=1, scorer_kwargs={"calls": calls})
    assert summary.resumed == done and summary.processed == len(reference) - done
    assert sum(calls) <= len(reference) - done + 1  # only the rest (batches stream across units; one padded)
    assert_same_rows(pd.read_parquet(out), reference)


def test_sigterm_flushes_finished_rows_and_exits(folder, reference, tmp_path):
    out = tmp_path / "scores.parquet"
    args = ["-m", "tests.test_score_pipeline", "run", str(folder[0]), str(out), "--delay", "0.3"]
    process = _launch(args)  # pieces every 30 s: nothing is written before the signal
    try:
        deadline = time.monotonic() + 120
        while not (sidecar_path(out) / "manifest.json").exists():
            assert process.poll() is None, process.communicate()[0].decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.5)  # a few batches of 2 in 0.3 s each
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output
    assert not out.exists() and not list(sidecar_path(out).glob("*.tmp"))
    done = _saved_rows(out)
    assert done >= 2  # the rows finished before SIGTERM were written on the way out
    summary = run(folder[0], out)
    assert summary.resumed == done
    assert_same_rows(pd.read_parquet(out), reference)


def test_two_process_gloo_run_equals_single_process(folder, reference, tmp_path):
    out = tmp_path / "scores.parquet"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "0"]
    run_args = ["-m", "tests.test_score_pipeline", "run", str(folder[0]), str(out), "--per-unit", "16"]
    process = _launch([*launcher, *run_args])
    try:
        output = process.communicate(timeout=240)[0].decode()
    finally:
        process.kill()
    assert process.returncode == 0, output
    table = pq.read_table(out)
    assert_same_rows(table.to_pandas(), reference)
    assert not sidecar_path(out).exists()
    assert "ranks=2 processed=[16, 9] total=25" in output  # each rank scored its own unit of the two


@pytest.mark.slow
def test_benchmark_gpu_code_path_runs_on_the_cpu():
    process = _launch([str(REPO_ROOT / "benchmarks" / "bench_score.py"), "gpu", "--dry-run"])
    try:
        output = process.communicate(timeout=300)[0].decode()
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "model FLOPs per image" in output and "best:" in output and "pipeline, 24 JPEGs" in output


@pytest.mark.slow
def test_benchmark_of_small_runs_pads_only_the_old_way():
    args = ["small", "--counts", "2,3", "--repeats", "1", "--image-size", "28", "--workers", "0"]
    process = _launch([str(REPO_ROOT / "benchmarks" / "bench_score.py"), *args])
    try:
        output = process.communicate(timeout=300)[0].decode()
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "     2  padded 1 x         16" in output and "     2   sized 1 x          2" in output
    assert "     3   sized 1 x          3" in output and "largest |score difference|" in output


def _main(argv: list[str]) -> None:
    """`run FOLDER OUT`: scores with the fake scorer (for the subprocess tests); exit 128+signal if stopped."""
    from iqa_cli.scoring.config import ScoreInterrupted

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run"])
    parser.add_argument("folder")
    parser.add_argument("out")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--flush-rows", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--per-unit", type=int, default=None, help="images per unit (default: the run's own)")
    args = parser.parse_args(argv)
    if args.per_unit is not None:
        fixed_unit_size(pytest.MonkeyPatch(), args.per_unit)
    config = ScoreConfig(
        out=Path(args.out),
        inputs=[args.folder],
        batch_size=args.batch_size,
        workers=1,
        quiet=True,
        flush_rows=args.flush_rows,
    )
    try:
        summary = score_images(config, scorer_factory=lambda device: FakeScorer(device, delay=args.delay))
    except ScoreInterrupted as exc:
        sys.exit(128 + exc.signum)
    if summary.is_main:
        ranks = os.environ.get("WORLD_SIZE", "1")
        print(f"ranks={ranks} processed={summary.processed_by_rank} total={summary.total}")


if __name__ == "__main__":
    _main(sys.argv[1:])


PREPROCESS = ClipPreprocessor(size=SIZE, crop_size=(SIZE, SIZE))


def _files(folder: Path):
    return open_inputs([str(folder)], SourceOptions())


def test_workers_build_the_familys_batch_in_shared_memory(tmp_path, monkeypatch):
    fixed_unit_size(monkeypatch, 64)  # the three images one unit
    for i in range(3):
        Image.new("RGB", (20 + i, 16), (i * 40, 90, 200)).save(tmp_path / f"{i}.png")
    source = _files(tmp_path)
    decode = Decoder(ClipTransform(PREPROCESS), load_image)
    collate = PadCollate(4, SquareCollate(SIZE, PREPROCESS), torch.bfloat16)
    stream = UnitStream(source, np.array([0]), np.array([0]), decode, collate)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)
    batch = next(iter(loader))
    pixels = batch["visual"]["pixel_values"]
    assert pixels.is_shared() and pixels.dtype == torch.bfloat16
    assert batch["unit"].tolist() == [0, 0, 0, -1] and batch["row"].tolist() == [0, 1, 2, -1]
    assert batch["name"] == ["0.png", "1.png", "2.png"] and [tuple(d) for d in batch["done"]] == [(0, None)]
    sample = next(source.samples(0))
    in_main = PadCollate(4, SquareCollate(SIZE, PREPROCESS))([(0, 0, sample, decode(sample))], [])
    assert not in_main["visual"]["pixel_values"].is_shared() and in_main["unit"].tolist() == [0, -1, -1, -1]


def test_a_per_frame_row_whose_transform_fails_is_an_error_row(tmp_path):
    """Decoder's contract: a failure is an error row, never raised; with --per-frame a frame the transform refuses
    (a 1000x4 one for Qwen-VL) is that frame's error row, and the video's own row and other frames stand."""
    from iqa_cli.sources import Sample
    from iqa_cli.video import Sampling
    from tests.videos import write_video

    clip = write_video(tmp_path / "clip.mp4", frames=12, fps=6)  # 1 frame per second: frames 0 and 6
    calls: list[int] = []

    def picky(frame: Image.Image) -> dict[str, torch.Tensor]:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("absolute aspect ratio must be smaller than 200")
        return {"x": torch.zeros(1)}

    decode = Decoder(picky, load_image, lambda video: {"v": torch.zeros(1)}, Sampling(fps=1.0), per_frame=True)
    rows = decode.rows(Sample("clip.mp4", path=str(clip), video=True))
    assert [(r.video, r.frame, r.visual is not None, r.error, r.ends_sample) for r in rows] == [
        (True, -1, True, None, False),
        (False, 0, True, None, False),
        (False, 6, False, "ValueError: absolute aspect ratio must be smaller than 200", True),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uint8_items_give_the_float_paths_batch_bit_for_bit(tmp_path, dtype, monkeypatch):
    """Workers hand over uint8 squares and the collate applies the value table into the batch: the batch is
    the float pixels (`ClipPreprocessor.pixels`, then the cast to the batch dtype) bit for bit, so the scores
    are the same. Through the loader's real path: files, Decoder, PadCollate, the 448 px preprocessing."""
    fixed_unit_size(monkeypatch, 64)  # the four files one unit
    rng = np.random.default_rng(3)
    for i, size in enumerate([(64, 48), (31, 77), (5, 5)]):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"not an image")
    pre = ClipPreprocessor()  # the released 448 px settings
    decode = Decoder(ClipTransform(pre), load_image)
    items = [(0, i, sample, decode(sample)) for i, sample in enumerate(_files(tmp_path).samples(0))]
    assert items[0][3][0]["pixel_values"].dtype == torch.uint8 and items[3][3][0] is None
    batch = PadCollate(5, SquareCollate(448, pre), dtype)(items, [])["visual"]["pixel_values"]
    floats = torch.stack([torch.from_numpy(pre.pixels(load_image(tmp_path / f"{i}.png"))) for i in range(3)])
    expected = torch.zeros((5, 3, 448, 448), dtype=dtype)
    expected[:3] = floats.to(dtype)
    bits = torch.int16 if dtype.itemsize == 2 else torch.int32  # bit patterns: -0.0 and 0.0 differ too
    assert batch.dtype == dtype and torch.equal(batch.view(bits), expected.view(bits))


def test_uint8_items_without_the_value_table_are_refused():
    item = {"pixel_values": torch.zeros((SIZE, SIZE, 3), dtype=torch.uint8)}
    with pytest.raises(ValueError, match="value table"):
        SquareCollate(SIZE)([item], 1, torch.float32)
