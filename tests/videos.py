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
