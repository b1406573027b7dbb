"""`iqa score` on videos with the tiny mPLUG-Owl2: a folder mixing images and clips (h264, vp9, a one-frame clip, a
truncated file, audio only), shards with video members and a Parquet bytes column give the same rows; a video's
score is the model fed its sampled frames by hand (Q-Align's indices, the frames' tokens flattened into the one
image slot); `--per-frame` rows are the frames scored as images; a call's shape depends on the frame count
alone; a run killed with SIGKILL resumes to the same rows; other sampling options are refused on resume."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from iqa_cli.evaluate import evaluate
from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint
from iqa_cli.scoring.config import ScoreConfig, ScoreInterrupted
from iqa_cli.scoring.driver import score_images
from iqa_cli.scoring.scorer import Scorer
from iqa_cli.scoring.store import sidecar_path
from tests.conftest import REPO_ROOT, fixed_unit_size, kill_when, run_iqa
from tests.videos import every_frame, has_encoder, stream_facts, write_audio_only, write_video

pytest.importorskip("av")
WEBM = has_encoder("libvpx-vp9")
SCORED = ("score", "std")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Clips of 3, 3 (vp9 or h264), 1 and 2 sampled frames at 1 fps, two images, and three broken files."""
    folder = tmp_path_factory.mktemp("clips")
    write_video(folder / "a.mp4", frames=20, fps=6, seed=1)
    write_video(folder / ("b.webm" if WEBM else "b.mov"), frames=16, fps=5, seed=2)
    write_video(folder / "c-one.mp4", frames=1, fps=4, seed=3)
    write_video(folder / "d.mkv", frames=60, fps=25, seed=4)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "e.png")
    Image.fromarray(rng.integers(0, 256, (26, 18, 3), dtype=np.uint8)).save(folder / "f.jpg")
    clip = write_video(folder / "g.mp4", frames=30, fps=10, seed=5)
    (folder / "x-cut.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    clip.unlink()
    write_audio_only(folder / "y-audio.mp4")
    (folder / "z-text.webm").write_text("not a video")
    return folder


VIDEOS = ["a.mp4", "b.webm" if WEBM else "b.mov", "c-one.mp4", "d.mkv"]
ERRORS = {
    "x-cut.mp4": "not a video FFmpeg can read: InvalidDataError: Invalid data found when processing input",
    "y-audio.mp4": "no video stream (the file has: audio)",
    "z-text.webm": "not a video FFmpeg can read: InvalidDataError: Invalid data found when processing input",
}


def _score(inputs: list[str], out: Path, tiny: Path, **options) -> pd.DataFrame:
    config = ScoreConfig(out=out, inputs=inputs, model=str(tiny), device="cpu", workers=0, quiet=True, **options)
    score_images(config)
    return pd.read_parquet(out)


def hand_score(model_dir: Path, path: Path) -> float:
    """The video's score computed outside the pipeline: frames at Q-Align's indices (decoded front to back), each
    padded and preprocessed as an image, all their tokens flattened into one sequence at the image slot of the
    video prompt, the decoder run over it, the five level logits at the last position."""
    from iqa_cli.models.mplug_owl2.language_model import Modality

    scorer = Scorer.from_pretrained(model_dir, device="cpu", dtype="float32")
    model, pre = scorer.backbone.model, scorer.preprocessor
    count, rate = stream_facts(path)
    indices = [int(rate * i) for i in range(int(count / rate))] or [0]
    frames = every_frame(path)
    pixels = torch.stack([torch.from_numpy(pre.pixels(Image.fromarray(frames[i]))) for i in indices])
    ids = torch.tensor(scorer.video_readout.input_ids)
    slot = int((ids == -200).nonzero())
    with torch.no_grad():
        tokens = model.encode_images(pixels).flatten(0, 1)  # F (Q + 1), C: q_align's `x.flatten(0, 1)`
        embed = model.model.embed_tokens
        sequence = torch.cat([embed(ids[:slot]), tokens, embed(ids[slot + 1 :])])[None]
        modality = Modality.from_blocks(torch.tensor([slot]), tokens.shape[0], sequence.shape[1])
        hidden, _ = model.model.decode(sequence, modality)
        logits = model.lm_head(hidden[0, -1])[list(scorer.video_readout.level_token_ids)]
    return float(torch.softmax(logits.double(), -1) @ torch.linspace(1, 5, 5, dtype=torch.float64))


def test_a_folder_of_images_and_clips(clips, tiny, tmp_path):
    out = tmp_path / "scores.parquet"
    result = run_iqa("score", str(clips), "--model", str(tiny), "--out", str(out), "--device", "cpu", "--per-frame")
    assert result.returncode == 0, result.stderr
    # 4 videos and 2 images scored, 3 broken files; the videos' 9 sampled frames as rows of their own
    assert "scored 6 of 9 images and videos (3 failed), 9 of 9 sampled frames in " in result.stderr
    table = pq.read_table(out)
    assert table.column_names == [
        "image", "score", "std", "probs", "level", "width", "height", "duration", "frames", "fps", "frame", "error",
    ]  # fmt: skip
    rows = table.to_pandas()
    own = rows[rows["frame"].isna()].set_index("image")
    assert list(own.index) == sorted(os.listdir(clips))
    for name, reason in ERRORS.items():
        assert own.loc[name, "error"] == reason and np.isnan(own.loc[name, "score"])
    scorer = Scorer.from_pretrained(tiny, device="cpu", dtype="float32")
    for name in VIDEOS:
        count, rate = stream_facts(clips / name)
        frames = [int(rate * i) for i in range(int(count / rate))] or [0]
        assert own.loc[name, "frames"] == len(frames) and own.loc[name, "fps"] == pytest.approx(rate)
        assert own.loc[name, "duration"] == pytest.approx(count / rate)
        assert (own.loc[name, "width"], own.loc[name, "height"]) == (32, 24)
        assert own.loc[name, "score"] == pytest.approx(hand_score(tiny, clips / name), abs=1e-5)
        mine = rows[(rows["image"] == name) & rows["frame"].notna()]
        assert mine["frame"].tolist() == frames and mine["frames"].isna().all()
        images = [Image.fromarray(every_frame(clips / name)[i]) for i in frames]
        expected = [r.score for r in scorer.score(images)]
        np.testing.assert_allclose(mine["score"].to_numpy(float), expected, rtol=0, atol=1e-5)
    stills = _score([str(clips / "e.png"), str(clips / "f.jpg")], tmp_path / "stills.parquet", tiny)
    np.testing.assert_allclose(own.loc[["e.png", "f.jpg"], "score"].to_numpy(float), stills["score"], atol=1e-6)
    assert own.loc[["e.png", "f.jpg"], "frames"].isna().all()
    gt = tmp_path / "gt.csv"  # iqa eval judges a video by its own row: the frames' rows are left out
    gt.write_text("image,mos\n" + "".join(f"{name},{i + 1}\n" for i, name in enumerate([*VIDEOS, "e.png", "f.jpg"])))
    report = evaluate(out, gt)
    assert report.counts["matched"] == 6 and "9 rows of single video frames (--per-frame) left out" in report.notes
    metadata = table.schema.metadata
    assert metadata[b"video_sampling"] == b'{"fps": 1.0, "max_frames": 32, "per_frame": true}'
    assert metadata[b"video_prompt"].decode() == scorer.video_readout.prompt
    assert "How would you rate the quality of this video?" in scorer.video_readout.prompt


def test_shards_and_parquet_cells_hold_videos(clips, tiny, tmp_path):
    names = sorted(os.listdir(clips))
    reference = _score([str(clips)], tmp_path / "folder.parquet", tiny).set_index("image")
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, name in enumerate(names):
            tar.add(clips / name, arcname=f"{i:04d}.{name.rsplit('.', 1)[1]}")
    # struct cells name the file (videos known by suffix); plain bytes cells are known by their container signature
    cells = [{"bytes": (clips / n).read_bytes(), "path": n} for n in names]
    pq.write_table(pa.table({"image": cells}), tmp_path / "structs.parquet", row_group_size=4)
    pq.write_table(pa.table({"image": [(clips / n).read_bytes() for n in names]}), tmp_path / "bytes.parquet")
    shards = _score([str(shard)], tmp_path / "shards.parquet", tiny)
    structs = _score([str(tmp_path / "structs.parquet")], tmp_path / "structs-out.parquet", tiny)
    plain = _score([str(tmp_path / "bytes.parquet")], tmp_path / "bytes-out.parquet", tiny)
    for got in (shards, structs, plain):
        assert len(got) == len(names)
        got = got.assign(image=names).set_index("image")
        for column in ("frames", "duration", "fps", "width", "height"):
            pd.testing.assert_series_equal(got[column], reference[column])
        np.testing.assert_allclose(got["score"].to_numpy(float), reference["score"].to_numpy(float), atol=1e-6)
        scored = got["error"].isna()
        assert scored.sum() == 6 and got.loc["e.png", "frames"] != got.loc["e.png", "frames"]  # an image: null


def test_a_videos_score_does_not_depend_on_its_batch_mates(clips, tiny, tmp_path):
    """A call holds videos of one frame count, as many as --batch-size frames (6: two videos of 3 frames, padded
    with a blank row when one is left): a.mp4 scores the same bit for bit as the only 3-frame clip of a run and
    beside b's 3 frames. (Runs of fewer samples than --batch-size use smaller calls, as for images.)"""
    others = [str(clips / n) for n in ("c-one.mp4", "d.mkv", "e.png", "f.jpg", "y-audio.mp4")]
    alone = _score([str(clips / "a.mp4"), *others], tmp_path / "alone.parquet", tiny, batch_size=6)
    everything = _score([str(clips)], tmp_path / "all.parquet", tiny, batch_size=6).set_index("image")
    assert alone["score"][0] == everything.loc["a.mp4", "score"]
    assert alone.set_index("image")["frames"].iloc[0] == everything.loc[VIDEOS[1], "frames"] == 3


def test_other_sampling_is_refused_on_resume_and_frames_n_samples_n(clips, tiny, tmp_path):
    out = tmp_path / "scores.parquet"
    video = str(clips / "a.mp4")
    first = _score([video], out, tiny)
    assert first["frames"].tolist() == [3]
    again = run_iqa("score", video, "--model", str(tiny), "--out", str(out), "--device", "cpu", "--fps", "2")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: {out} exists and was written with another video sampling (--fps 1.0, now --fps 2.0); pass "
        "--overwrite to replace it (or --out another file)"
    ]
    both = run_iqa("score", video, "--model", str(tiny), "--out", str(out), "--fps", "1", "--frames", "8")
    assert both.returncode == 2 and "sample videos one way, not both" in both.stderr
    eight = _score([video], tmp_path / "eight.parquet", tiny, frames=8)
    assert eight["frames"].tolist() == [8]


class Slow:
    """The tiny scorer with a pause in every model call (so a run can be killed midway)."""

    def __init__(self, scorer: Scorer, delay: float):
        self.scorer, self.delay = scorer, delay

    def __getattr__(self, name: str):
        return getattr(self.scorer, name)

    def score_batch(self, visual):
        time.sleep(self.delay)
        return self.scorer.score_batch(visual)

    def score_video_batch(self, visual):
        time.sleep(self.delay)
        return self.scorer.score_video_batch(visual)


def _saved_rows(out: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in sidecar_path(out).glob("unit-*.parquet"))


def test_sigkill_midway_then_rerun_gives_every_row_once(clips, tiny, tmp_path, monkeypatch):
    """With --per-frame a video is several rows: pieces hold whole videos, so the rerun goes on after the last one."""
    fixed_unit_size(monkeypatch, 64)  # the folder one unit, here and in the killed run: its rows are pieces
    out = tmp_path / "scores.parquet"
    reference = _score([str(clips)], tmp_path / "reference.parquet", tiny, per_frame=True, batch_size=2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "tests.test_score_video", str(clips), str(out), str(tiny)]
    process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    kill_when(process, lambda: _saved_rows(out) >= 3, "nothing was written")
    assert not out.exists() and 3 <= _saved_rows(out) < len(reference)
    pieces = list(sidecar_path(out).glob("unit-*.from-*.parquet"))
    assert any(b"iqa_samples" in (pq.read_schema(p).metadata or {}) for p in pieces)  # a video with its frames
    resumed = _score([str(clips)], out, tiny, per_frame=True, batch_size=2)
    pd.testing.assert_frame_equal(resumed.drop(columns=["probs"]), reference.drop(columns=["probs"]))


def _main(clips: str, out: str, tiny: str) -> None:
    """The killed run: one piece per finished sample (flush_rows=1), 0.3 s per model call."""
    fixed_unit_size(pytest.MonkeyPatch(), 64)
    config = ScoreConfig(
        out=Path(out), inputs=[clips], model=tiny, device="cpu", workers=0, quiet=True, per_frame=True, batch_size=2,
        flush_rows=1,
    )  # fmt: skip
    slow = Slow(Scorer.from_pretrained(tiny, device="cpu", dtype="float32"), 0.3)
    try:
        score_images(config, scorer_factory=lambda device: slow)
    except ScoreInterrupted as exc:
        sys.exit(128 + exc.signum)


if __name__ == "__main__":
    _main(*sys.argv[1:4])
