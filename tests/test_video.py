"""Video decoding and sampling (`iqa_cli.video`) on clips written here with PyAV: the sampled indices are Q-Align's
`load_video` formula, the frames equal a decode-everything reference with and without seeking, and broken files
(truncated, audio only, not a video, empty) are one-line errors."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import pytest

from iqa_cli.video import Sampling, VideoDecodeError, is_video_name, load_video, looks_like_video
from tests.videos import every_frame, has_encoder, stream_facts, write_audio_only, write_video

pytest.importorskip("av")
VP9 = pytest.mark.skipif(not has_encoder("libvpx-vp9"), reason="this PyAV build has no vp9 encoder")


def qalign_indices(frames: int, fps: float) -> list[int]:
    """q_align/evaluate/scorer.py `load_video`, with decord's len(vr) and get_avg_fps()."""
    return [int(fps * i) for i in range(int(frames / fps))]


@pytest.mark.parametrize("frames", [1, 5, 24, 25, 299, 300, 301, 1000])
@pytest.mark.parametrize("fps", [1.0, 5.0, 23.976023976023978, 24.0, 25.0, 29.97002997002997, 30.0, 59.94, 60.0])
def test_one_frame_per_second_is_q_aligns_formula(frames, fps):
    expected = qalign_indices(frames, fps) or [0]  # shorter than a second: the first frame (the reference: none)
    assert Sampling(fps=1.0, max_frames=10_000).indices(frames, fps) == expected


def test_other_rates_counts_and_caps():
    assert Sampling(fps=2.0).indices(30, 10.0) == [0, 5, 10, 15, 20, 25]  # step r / F = 5 frames
    assert Sampling(fps=None, frames=4).indices(40, 10.0) == [5, 15, 25, 35]  # middles of 4 equal runs
    assert Sampling(fps=None, frames=4).indices(2, 10.0) == [0, 0, 1, 1]  # fewer frames than asked: repeats
    capped = Sampling(fps=1.0, max_frames=3).indices(3000, 10.0)  # 300 seconds -> 3 of the 300 one-second frames
    assert capped == [500, 1500, 2500] and all(i in qalign_indices(3000, 10.0) for i in capped)
    with pytest.raises(ValueError):
        Sampling(fps=1.0, frames=8)


CLIPS = [
    ("clip.mp4", {"frames": 20, "fps": 6}),
    ("ntsc.mp4", {"frames": 70, "fps": Fraction(30000, 1001), "keyint": None}),  # x264's defaults: B-frames
    ("clip.mkv", {"frames": 30, "fps": 10}),
    ("clip.avi", {"frames": 15, "fps": 5}),
    pytest.param("clip.webm", {"frames": 17, "fps": 5}, marks=VP9),
]


@pytest.mark.parametrize(("name", "spec"), CLIPS)
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(fps=2.5), Sampling(fps=None, frames=8)])
def test_sampled_frames_equal_decoding_every_frame(tmp_path, name, spec, sampling):
    path = write_video(tmp_path / name, **spec)
    reference = every_frame(path)
    count, rate = stream_facts(path)
    assert count == len(reference) == spec["frames"]
    video = load_video(path, sampling)
    assert video.indices == sampling.indices(count, rate)
    if sampling.frames is None and sampling.fps == 1.0:
        assert video.indices == qalign_indices(count, rate)
    assert (video.frame_count, video.fps, video.width, video.height) == (count, rate, 32, 24)
    assert video.duration == pytest.approx(count / rate)
    for image, index in zip(video.frames, video.indices, strict=True):
        np.testing.assert_array_equal(np.asarray(image), reference[index])
    unseeked = load_video(path, sampling, seek=False)
    for a, b in zip(video.frames, unseeked.frames, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bytes_one_frame_clips_and_sniffing(tmp_path):
    one = write_video(tmp_path / "one.mp4", frames=1, fps=4)
    short = write_video(tmp_path / "short.mp4", frames=3, fps=10)  # 0.3 s at 1 fps: less than one step
    for path in (one, short):
        video = load_video(path.read_bytes())
        assert video.indices == [0] and len(video.frames) == 1
        np.testing.assert_array_equal(np.asarray(video.frames[0]), every_frame(path)[0])
    assert load_video(io.BytesIO(short.read_bytes()), Sampling(fps=None, frames=5)).indices == [0, 0, 1, 2, 2]
    assert looks_like_video(one.read_bytes()) and looks_like_video(write_video(tmp_path / "a.mkv").read_bytes())
    assert looks_like_video(write_video(tmp_path / "a.avi").read_bytes())
    assert not looks_like_video(b"\x89PNG\r\n\x1a\n" + bytes(16)) and not looks_like_video(b"\xff\xd8\xff" + bytes(16))
    assert is_video_name("a/B.MP4") and is_video_name("c.webm") and not is_video_name("d.png")


def test_broken_files_are_one_line_errors(tmp_path):
    clip = write_video(tmp_path / "clip.mp4", frames=40, fps=10)  # moov after the data
    (tmp_path / "cut.mp4").write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    faststart = write_video(tmp_path / "fs.mp4", frames=40, fps=10, options={"movflags": "faststart"})
    (tmp_path / "cut-fs.mp4").write_bytes(faststart.read_bytes()[: faststart.stat().st_size // 2])
    mkv = write_video(tmp_path / "clip.mkv", frames=60, fps=25)
    (tmp_path / "cut.mkv").write_bytes(mkv.read_bytes()[: mkv.stat().st_size // 2])
    write_audio_only(tmp_path / "audio.mp4")
    (tmp_path / "text.mp4").write_text("not a video at all, just some words")
    (tmp_path / "empty.mp4").write_bytes(b"")
    expected = {
        "cut.mp4": "not a video FFmpeg can read: InvalidDataError: Invalid data found when processing input",
        "cut-fs.mp4": "truncated: ",
        "cut.mkv": "truncated: ",
        "audio.mp4": "no video stream (the file has: audio)",
        "text.mp4": "not a video FFmpeg can read: InvalidDataError: Invalid data found when processing input",
        "empty.mp4": "empty file (0 bytes)",
    }
    for name, reason in expected.items():
        with pytest.raises(VideoDecodeError) as caught:
            load_video(tmp_path / name)
        assert caught.value.reason.startswith(reason), (name, caught.value.reason)
        assert "\n" not in str(caught.value) and str(tmp_path) not in caught.value.reason
