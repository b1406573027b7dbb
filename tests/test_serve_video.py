"""`iqa serve` with videos: the real server (a subprocess) on a tiny mPLUG-Owl2 and a tiny Qwen2-VL scores a posted
video as `iqa score` scores the same file with the same --fps/--frames; a request mixing images, videos and a
broken video gets one answer per entry, in order, the broken one an error entry with `iqa score`'s text; two
videos of one frame count share a model call and score as each alone; a family that scores no videos gives an
error entry; sampling options no server should run with are refused in one line."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("av")
pytest.importorskip("fastapi", reason="the serve extra (pip install 'iqa-cli[serve]') is not installed")

from tests.test_score_video import _score
from tests.test_serve import TOL, _batch_totals, b64, requests, serving
from tests.test_serve_app import RowCountScorer, served
from tests.videos import write_video

# At --fps 2: a.mp4 and b.mkv 4 frames each (one call of 2 rows at --max-batch 8), c.mp4 2 frames.
CLIPS = {"a.mp4": (12, 6, 1), "b.mkv": (8, 4, 2), "c.mp4": (6, 6, 3)}  # name: (frames, fps, seed)
MIXED = ["e.png", "a.mp4", "x-cut.mp4", "c.mp4", "f.jpg"]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve-video")
    for name, (frames, fps, seed) in CLIPS.items():
        write_video(folder / name, frames=frames, fps=fps, seed=seed)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "e.png")
    Image.fromarray(rng.integers(0, 256, (26, 18, 3), dtype=np.uint8)).save(folder / "f.jpg")
    whole = (folder / "a.mp4").read_bytes()
    (folder / "x-cut.mp4").write_bytes(whole[: len(whole) // 2])  # starts like an MP4: sent to the video decoder
    return folder


def _post(url: str, names: list[str], media: Path, **extra) -> dict:
    images = [b64((media / name).read_bytes()) for name in names]
    response = requests.post(f"{url}/score", json={"images": images, **extra}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def mplug(tmp_path_factory) -> Path:
    from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve-video-tiny") / "model", seed=3)


def test_mplug_owl2_serves_videos_as_iqa_score_scores_them(mplug, media, tmp_path):
    cli = _score([str(media)], tmp_path / "scores.parquet", mplug, fps=2.0).set_index("image")
    assert cli.loc["x-cut.mp4", "error"].startswith("not a video FFmpeg can read")
    assert list(cli.loc[["a.mp4", "b.mkv", "c.mp4"], "frames"]) == [4, 4, 2]
    with serving(mplug, "--fps", "2", "--max-batch", "8", "--max-wait-ms", "50") as url:
        body = _post(url, MIXED, media, probs=True)
        scored = [0, 1, 3, 4]
        assert np.ptp(cli.loc[[MIXED[i] for i in scored], "score"]) > 100 * TOL  # distinct: a mix-up would show
        np.testing.assert_allclose(
            [body["scores"][i] for i in scored], cli.loc[[MIXED[i] for i in scored], "score"], atol=TOL, rtol=0
        )
        assert body["scores"][2] is None and body["std"][2] is None and body["probs"][2] is None
        assert body["errors"] == [None, None, f"images[2]: {cli.loc['x-cut.mp4', 'error']}", None, None]
        assert body["frames"] == [None, 4, None, 2, None]
        assert body["duration"] == [None, pytest.approx(2.0), None, pytest.approx(1.0), None]
        assert body["fps"] == [None, pytest.approx(6.0), None, pytest.approx(6.0), None]
        probs = np.asarray(body["probs"][1])
        assert probs.sum() == pytest.approx(1, abs=1e-6) and probs @ np.linspace(1, 5, 5) == pytest.approx(
            body["scores"][1], abs=1e-6
        )

        # two videos of 4 frames fill one call of 2 rows; alone, each is the one row of a padded call of 2
        before = _batch_totals(url)
        together = _post(url, ["a.mp4", "b.mkv"], media)["scores"]
        total, calls = (a - b for a, b in zip(_batch_totals(url), before, strict=True))
        assert (total, calls) == (2, 1)  # the two shared one model call
        alone = [_post(url, [name], media)["scores"][0] for name in ("a.mp4", "b.mkv")]
        assert together == alone  # bit for bit
        images_only = _post(url, ["e.png", "f.jpg"], media)
        assert "frames" not in images_only  # a request without a video: the answer as before

        response = requests.post(f"{url}/", data=pickle.dumps({"images": [(media / "a.mp4").read_bytes()]}), timeout=60)
        assert response.status_code == 200, response.text
        assert pickle.loads(response.content)["outputs"] == pytest.approx([cli.loc["a.mp4", "score"] / 5], abs=TOL)
        health = requests.get(f"{url}/health", timeout=10).json()
        assert health["video_sampling"] == {"fps": 2.0, "max_frames": 32}


def test_qwen2_vl_serves_videos_as_iqa_score_scores_them(media, tmp_path_factory, tmp_path):
    from iqa_cli.models.hf_vlm.tiny import tiny_checkpoint

    checkpoint = tiny_checkpoint("qwen2_vl", tmp_path_factory.mktemp("serve-video-qwen") / "qwen2_vl", seed=1)
    names = ["a.mp4", "c.mp4", "e.png"]
    cli = _score([str(media / n) for n in names], tmp_path / "scores.parquet", checkpoint, frames=4)
    cli = cli.set_index(cli["image"].map(lambda path: Path(path).name))
    assert cli["error"].isna().all(), cli["error"].tolist()
    with serving(checkpoint, "--frames", "4", "--max-batch", "8", "--max-wait-ms", "50") as url:
        body = _post(url, names, media)
        np.testing.assert_allclose(body["scores"], cli.loc[names, "score"], atol=TOL, rtol=0)
        assert body["frames"] == [4, 4, None] and body["errors"] == [None, None, None]
        alone = _post(url, ["c.mp4"], media)["scores"][0]  # beside a.mp4 (one call of 2 rows) and alone
        assert abs(alone - body["scores"][1]) < TOL


def test_a_family_without_videos_gives_an_error_entry(monkeypatch, media):
    with served(monkeypatch, RowCountScorer(), max_batch=4, max_wait_ms=0) as url:
        body = _post(url, ["a.mp4", "e.png"], media)
    assert body["errors"] == ["images[0]: this model family does not score videos", None]
    assert body["scores"][0] is None and 1 < body["scores"][1] < 5
    assert body["frames"] == [None, None]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"frames": 40}, "--frames 40: over --max-frames 32"),
        ({"fps": 1.0, "frames": 8}, "--fps 1 and --frames 8: sample videos one way"),
        ({"fps": 0.0}, "--fps 0: use a positive number"),
        ({"task": "beauty"}, "--task beauty"),
    ],
)
def test_sampling_options_are_checked_before_the_server_starts(mplug, options, message):
    from iqa_cli.errors import UserError
    from iqa_cli.serving.config import ServeConfig

    with pytest.raises(UserError, match=message):
        ServeConfig(model=str(mplug), devices=["cpu"], **options).check()
