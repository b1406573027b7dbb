"""Tiny videos written with PyAV for the tests (h264 in .mp4/.mkv, vp9 in .webm, mpeg4 in .avi): each frame a
different picture, so a test can tell which frames it got; and a clip with audio only."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np

SIZE = (32, 24)  # width, height: tiny, and even (yuv420p)
CODECS = {".mp4": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4", ".mov": "libx264"}


def has_encoder(codec: str) -> bool:
    """Whether the installed PyAV wheel's FFmpeg can encode `codec`."""
    import av

    try:
        av.codec.Codec(codec, "w")
    except Exception:
        return False
    return True


def numbered_frame(i: int, size: tuple[int, int] = SIZE, seed: int = 0) -> np.ndarray:
    """Frame i: noise seeded by (seed, i), so every frame of a clip differs from the others."""
    rng = np.random.default_rng([seed, i])
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def write_video(
    path: str | Path,
    *,
    frames: int = 12,
    fps: float | Fraction = 6,
    codec: str | None = None,
    size: tuple[int, int] = SIZE,
    seed: int = 0,
    keyint: int | None = 4,
    content: Callable[[int], np.ndarray] | None = None,
    options: dict | None = None,
) -> Path:
    """A clip of `frames` frames at `fps`, frame i from `content(i)` (default `numbered_frame`); key frames every
    `keyint` frames (None: the encoder's default, x264's with B-frames)."""
    import av

    path = Path(path)
    codec = codec or CODECS[path.suffix.lower()]
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if keyint is not None:
            stream.options = {"g": str(keyint)}
        for i in range(frames):
            picture = content(i) if content is not None else numbered_frame(i, size, seed)
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: str | Path) -> Path:
    """An .mp4 holding one AAC stream and no video."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def every_frame(path: str | Path) -> list[np.ndarray]:
    """Every frame of the file's video stream, decoded front to back by PyAV directly (the reference)."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def stream_facts(path: str | Path) -> tuple[int, float]:
    """(frames, average frame rate) as decord reports them: the stream's packets counted, its avg_frame_rate."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for packet in container.demux(stream) if packet.size)
        return count, float(stream.average_rate)


def graded_clip(strength: int, seed: int, frames: int = 4, size: tuple[int, int] = SIZE) -> Callable[[int], np.ndarray]:
    """Frames of a clip whose quality falls with `strength` (0..7): a colour gradient with three hard-edged boxes
    drifting one pixel per frame, box-blurred `strength` times and noised with std 9 x `strength` grey levels."""
    rng = np.random.default_rng(seed)
    w, h = size
    span = w + frames
    ramp = np.linspace(0, 1, span)[None, :, None]
    start, end = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    scene = np.broadcast_to(start + (end - start) * ramp, (h, span, 3)).copy()
    for _ in range(3):
        x, y = rng.integers(0, span - w // 4), rng.integers(0, h - h // 4)
        scene[y : y + rng.integers(h // 4, h // 2), x : x + rng.integers(w // 4, w // 2)] = rng.uniform(0, 255, 3)
    noise = np.random.default_rng([seed, 1]).normal(0, 9 * strength, (frames, h, w, 3))

    def frame(i: int) -> np.ndarray:
        picture = scene[:, i : i + w].copy()
        for _ in range(strength):  # box blur, one pixel per step
            picture = (picture + np.roll(picture, 1, 0) + np.roll(picture, 1, 1)) / 3
        return np.clip(picture + noise[i], 0, 255).astype(np.uint8)

    return frame


def write_graded_clips(
    folder: str | Path, n: int, *, seed: int = 0, frames: int = 4, fps: int = 2, size: tuple[int, int] = SIZE
) -> Path:
    """`n` .mp4 clips of graded strength (`graded_clip`, strengths in turn) and `scores.csv` (video, mos, std): the
    MOS falls linearly from 5 to 1 with the strength, with a little seeded jitter; returns the CSV's path."""
    folder = Path(folder)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = ["video,mos,std"]
    for i in range(n):
        strength = i % 8
        name = f"clip{i:04d}.mp4"
        write_video(
            folder / "videos" / name,
            frames=frames,
            fps=fps,
            size=size,
            content=graded_clip(strength, seed + i, frames, size),
        )
        lines.append(f"{name},{5 - 4 * strength / 7 + rng.normal(0, 0.1):.4f},0.5")
    (folder / "scores.csv").write_text("\n".join(lines) + "\n")
    return folder / "scores.csv"
