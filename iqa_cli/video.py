"""Video decoding and frame sampling, the same for every model family and every source (PyAV: FFmpeg in its wheels).

Which frames a video is scored on (`Sampling`):

- `fps=F` (the default, F = 1): Q-Align's `load_video` (q_align/evaluate/scorer.py) at F frames per second of
  video. With the video's average frame rate r and its n frames, the step is r / F frames and the indices are
  `[int(step * i) for i in range(int(n / step))]`; at F = 1 the step is r itself, so this is the reference's
  `[int(fps * i) for i in range(int(len(vr) / fps))]` to the bit, and a video scored here sees the frames
  Q-Align's scorer sees. n counts the video stream's packets (decord's `len(vr)` counts its index of them too)
  and r is the stream's average frame rate (decord's `get_avg_fps`).
- `frames=N`: N frames spread uniformly, the middle frame of each of N equal segments, `int((i + 0.5) * n / N)`
  (Q-ReAlign scores 8 uniform frames; its exact index rule is not confirmed here). A video of fewer than N frames
  repeats some, so every video has exactly N.
- `max_frames` caps `fps` sampling: a video longer than `max_frames` steps keeps `max_frames` of its indices, the
  middle one of each of that many equal runs (the whole video stays covered). The default, 32, keeps a 7B
  mPLUG-Owl2 row within LLaMA-2's 4,096 positions (32 x 65 visual tokens) and a worker's decoded frames bounded
  (32 frames of 1080p are 200 MB of RGB).
- A video shorter than one step (a one-frame clip, half a second at `fps=1`) gets its first frame: the reference
  gets none and fails.

Decoding seeks: the packets are read once without decoding (their timestamps and key frames: the frame index),
then for each sampled frame the decoder jumps to the key frame at or before it when that skips more than
`MIN_SKIP` frames, and decodes forward from there, so a 1-frame-per-second sample of a 30 fps video decodes a
fraction of its frames (`benchmarks/bench_video.py`). The frames equal those of decoding every frame
(tests/test_video.py). A container whose packets have no timestamps is decoded front to back. Frames are
converted to RGB by FFmpeg (PyAV's `to_ndarray(format="rgb24")`).
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from iqa_cli.constants import DEFAULT_MAX_PIXELS
from iqa_cli.errors import DecodeError

if TYPE_CHECKING:  # importing this module (the score options' defaults) loads neither numpy nor PyAV
    import numpy as np

# Extensions (lower case) of the videos a folder walk picks up and a WebDataset sample's video member may have.
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")
DEFAULT_FPS = 1.0  # Q-Align's load_video: one frame per second
DEFAULT_MAX_FRAMES = 32  # see the module docstring
# A seek costs about as much as decoding this many frames (the demuxer's jump, the decoder flushed and refilled:
# measured on 720p h264, benchmarks/bench_video.py): nearer key frames are decoded through instead.
MIN_SKIP = 12
# Leading bytes of the containers above (a Parquet cell or shard member carries no file name to go by).
_EBML = b"\x1a\x45\xdf\xa3"  # Matroska / WebM
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # MP4 / MOV / M4V, at bytes 4..8


class VideoDecodeError(DecodeError):
    """A video that cannot be decoded (no video stream, truncated, not a video)."""


def is_video_name(name: str) -> bool:
    """Whether a file name has a video suffix (case-insensitive); cheap enough for a listing of millions."""
    return name[-5:].lower().endswith(VIDEO_EXTENSIONS)


def looks_like_video(data: bytes | memoryview | None) -> bool:
    """Whether encoded bytes start like one of the video containers (MP4/MOV, Matroska/WebM, AVI)."""
    if not data or len(data) < 12:
        return False
    head = bytes(data[:12])
    return head.startswith(_EBML) or head[4:8] in _ISO_BOXES or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")


@dataclass(frozen=True)
class Sampling:
    """Which frames of a video are scored: `fps` frames per second (capped at `max_frames`) or `frames` uniform
    frames (see the module docstring)."""

    fps: float | None = DEFAULT_FPS
    frames: int | None = None
    max_frames: int = DEFAULT_MAX_FRAMES

    def __post_init__(self) -> None:
        if (self.fps is None) == (self.frames is None):
            raise ValueError("sample by fps or by a number of frames, not both or neither")

    def indices(self, count: int, rate: float) -> list[int]:
        """Frame indices (ascending, repeats allowed for `frames`) of a video of `count` frames at `rate` per second."""
        if count < 1:
            return []
        if self.frames is not None:
            return [min(count - 1, int((i + 0.5) * count / self.frames)) for i in range(self.frames)]
        step = rate / self.fps
        chosen = [int(step * i) for i in range(int(count / step))] if step > 0 else []
        chosen = [i for i in chosen if i < count] or [0]
        if len(chosen) > self.max_frames:
            chosen = [chosen[int((i + 0.5) * len(chosen) / self.max_frames)] for i in range(self.max_frames)]
        return chosen

    def describe(self) -> dict[str, Any]:
        """What a run records (output metadata, the request a resume must match)."""
        if self.frames is not None:
            return {"frames": self.frames}
        return {"fps": self.fps, "max_frames": self.max_frames}


@dataclass
class Video:
    """The sampled frames of one video (RGB PIL images) and what the output says about it."""

    frames: list[Any]
    indices: list[int]
    width: int
    height: int
    frame_count: int  # frames in the video stream
    fps: float  # its average frame rate

    @property
    def duration(self) -> float:
        """Seconds: frames / average frame rate (what the sampling sees)."""
        return self.frame_count / self.fps if self.fps > 0 else float("nan")


def load_video(
    source: str | Path | IO[bytes] | bytes,
    sampling: Sampling = Sampling(),
    *,
    seek: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Video:
    """Decodes the sampled frames of a video file (a path, a binary file object, or its bytes).

    Args:
        seek: jump to the key frame before each sampled frame where that skips frames (False: decode every
            frame up to the last sampled one; the same frames, for benchmarks and tests).
        max_pixels: frames larger than this (width x height) are refused, as images are.

    Raises:
        VideoDecodeError: a missing, empty, truncated or undecodable file, or one without a video stream.
    """
    name = str(source) if isinstance(source, (str, Path)) else getattr(source, "name", None)
    av = _pyav()
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    _check_not_empty(source, name)
    try:
        container = av.open(str(source) if isinstance(source, Path) else source, mode="r")
    except Exception as err:  # FFmpeg refuses untrusted files with many error types
        raise VideoDecodeError(f"not a video FFmpeg can read: {_describe(err)}", name) from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise VideoDecodeError(f"no video stream (the file has: {', '.join(kinds)})", name)
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if max_pixels is not None and width * height > max_pixels:
            raise VideoDecodeError(
                f"frames of {width}x{height} = {width * height} pixels exceed the limit of {max_pixels}", name
            )
        rate = _frame_rate(stream)
        try:
            index = _packet_index(container, stream)
        except Exception as err:
            raise VideoDecodeError(f"cannot read the video's packets: {_describe(err)}", name) from None
        if index.count == 0:
            raise VideoDecodeError("the video stream has no frames", name)
        if rate <= 0:
            raise VideoDecodeError("the video stream has no frame rate", name)
        expected = _listed_frames(container, stream, rate)
        if expected and index.count < expected:
            raise VideoDecodeError(f"truncated: {index.count} of the {expected} frames its header lists", name)
        wanted = sampling.indices(index.count, rate)
        try:
            arrays = _decode(container, stream, index, wanted, seek)
        except VideoDecodeError as err:
            raise VideoDecodeError(err.reason, name) from None
        except Exception as err:
            raise VideoDecodeError(f"cannot decode: {_describe(err)}", name) from None
    from PIL import Image

    frames = [Image.fromarray(a) for a in arrays]
    if frames:
        width, height = frames[0].size
    return Video(frames, wanted, width, height, index.count, rate)


@dataclass
class _PacketIndex:
    """The video stream's frames by presentation time: sorted pts and which of them are key frames."""

    count: int
    pts: list[int] | None  # None when some packet has no pts (decode front to back)
    keyframes: list[int]  # sorted pts of key frames


def _packet_index(container: Any, stream: Any) -> _PacketIndex:
    """One pass over the packets (nothing decoded); the container is rewound afterwards."""
    pts: list[int | None] = []
    keys: list[int] = []
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream packet
            continue
        pts.append(packet.pts)
        if packet.is_keyframe and packet.pts is not None:
            keys.append(packet.pts)
    container.seek(0, backward=True, any_frame=False, stream=stream)
    if not pts:
        return _PacketIndex(0, None, [])
    if any(p is None for p in pts) or len(set(pts)) != len(pts):
        return _PacketIndex(len(pts), None, [])
    ordered = sorted(p for p in pts if p is not None)
    return _PacketIndex(len(ordered), ordered, sorted(keys) or [ordered[0]])


def _decode(container: Any, stream: Any, index: _PacketIndex, wanted: list[int], seek: bool) -> list[np.ndarray]:
    """The frames at `wanted` (ascending frame indices, repeats allowed) as RGB arrays."""
    if not wanted:
        return []
    targets = sorted(set(wanted))
    found: dict[int, np.ndarray] = {}
    if index.pts is None:  # no timestamps: count frames front to back
        for i, frame in enumerate(container.decode(stream)):
            if i in targets:
                found[i] = frame.to_ndarray(format="rgb24")
            if i >= targets[-1]:
                break
    else:
        by_pts = {index.pts[i]: i for i in targets}
        frames: Iterator[Any] | None = None
        at = -1  # frame index of the last decoded frame
        for target in targets:
            pts = index.pts[target]
            if target in found:
                continue
            key = index.keyframes[max(0, bisect.bisect_right(index.keyframes, pts) - 1)]
            skipped = bisect.bisect_left(index.pts, key) - at - 1  # frames a seek to `key` would not decode
            if frames is None or (seek and skipped > MIN_SKIP):
                if seek and skipped > MIN_SKIP:
                    container.seek(key, backward=True, any_frame=False, stream=stream)
                frames = container.decode(stream)
            for frame in frames:
                if frame.pts is not None:
                    at = bisect.bisect_left(index.pts, frame.pts)
                if frame.pts in by_pts and by_pts[frame.pts] not in found:
                    found[by_pts[frame.pts]] = frame.to_ndarray(format="rgb24")
                if frame.pts is not None and frame.pts >= pts:
                    break
    missing = [i for i in targets if i not in found]
    if missing:
        raise VideoDecodeError(f"frame {missing[0]} of {index.count} could not be decoded (a truncated file?)")
    return [found[i] for i in wanted]


def _listed_frames(container: Any, stream: Any, rate: float) -> int:
    """Frames the file says it has: MP4's sample count, else (a file of one stream, as Matroska/WebM) its
    duration x frame rate, less one for rounding; 0 when unknown. A file cut short has fewer packets."""
    if stream.frames:
        return int(stream.frames)
    if len(container.streams) == 1 and container.duration and rate > 0:
        return max(0, round(container.duration / 1_000_000 * rate) - 1)
    return 0


def _pyav() -> Any:
    try:
        import av
    except ImportError:
        raise VideoDecodeError("videos need PyAV: pip install av (or pip install 'iqa-cli[video]')") from None
    return av


def _frame_rate(stream: Any) -> float:
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate:
            return float(rate)
    return 0.0


def _check_not_empty(source: Any, name: str | None) -> None:
    if isinstance(source, (str, Path)):
        try:
            size = Path(source).stat().st_size
        except OSError as err:
            raise VideoDecodeError(f"cannot read file: {err.strerror or err}", str(source)) from None
        if size == 0:
            raise VideoDecodeError("empty file (0 bytes)", name)
    elif isinstance(source, io.BytesIO) and source.getbuffer().nbytes == 0:
        raise VideoDecodeError("empty file (0 bytes)", name)


def _describe(err: BaseException) -> str:
    """FFmpeg's reason without the file name it appends (error rows name the video themselves)."""
    text = getattr(err, "strerror", None) or str(err)
    return " ".join(f"{type(err).__name__}: {text}".split())
