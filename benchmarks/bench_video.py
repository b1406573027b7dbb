"""CPU videos/s of `iqa score` on 10-second 720p clips, at `--fps 1` (Q-Align's sampling: 10 frames) and `--frames 8`,
split into decoding (PyAV: demux, seek, decode, RGB) with the family's preprocessing, and the model call; and the
decoding alone with seeking vs decoding every frame up to the last sampled one.

The clips are written here with PyAV's libx264 (30 fps, a key frame every `--keyint` frames: 60 is a 2-second GOP
as streaming encoders use; x264's default is 250, where a 10-second clip has two key frames and seeking saves
little), a drifting gradient with moving boxes. The model is the tiny random mPLUG-Owl2 at the released 448 px
preprocessing, so the preprocessing is the real cost (pad to a square, bicubic resize of a 1280x720 frame to 448)
and the model call is what a 64-wide model costs, not a 7B one (see BENCHMARKS.md for how the 7B's time scales:
65 visual tokens per frame, so 650 tokens per video at --fps 1 on a 10-second clip).

    python benchmarks/bench_video.py                          # 6 clips, keyint 60, 3 repeats
    python benchmarks/bench_video.py --clips 2 --seconds 3 --size 320x180 --repeat 1   # a quick check
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from timing import best_seconds

from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint
from iqa_cli.process import quiet_torchao_notice
from iqa_cli.scoring.loader import Decoder
from iqa_cli.scoring.scorer import Scorer
from iqa_cli.sources import Sample
from iqa_cli.video import Sampling, load_video

quiet_torchao_notice()


def write_clip(path: Path, seconds: float, size: tuple[int, int], keyint: int, seed: int) -> Path:
    import av

    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 1, w + 4 * int(30 * seconds))[None, :, None]
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    scene = np.broadcast_to(start + (end - start) * ramp, (h, ramp.shape[1], 3)).astype(np.uint8).copy()
    for _ in range(12):
        x, y = int(rng.integers(0, scene.shape[1] - w // 8)), int(rng.integers(0, h - h // 8))
        scene[y : y + h // 8, x : x + w // 8] = rng.integers(0, 256, 3)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(30))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"g": str(keyint), "preset": "veryfast"}
        for i in range(int(30 * seconds)):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(scene[:, 4 * i : 4 * i + w]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--keyint", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = [write_clip(tmp / f"clip{i}.mp4", args.seconds, size, args.keyint, i) for i in range(args.clips)]
        scorer = Scorer.from_pretrained(write_tiny_checkpoint(tmp / "tiny", image_size=448), device="cpu",
                                        dtype="float32")  # fmt: skip
        print(f"{args.clips} clips of {args.seconds:g} s, {size[0]}x{size[1]} at 30 fps, h264 with a key frame every "
              f"{args.keyint} frames ({sum(c.stat().st_size for c in clips) / len(clips) / 1e6:.2f} MB each); the tiny "
              f"mPLUG-Owl2 at 448 px; one thread; best of {args.repeat}; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores")  # fmt: skip
        print(f"{'sampling':14s} {'frames':>6s} {'decode+prep ms':>15s} {'model ms':>9s} {'videos/s':>9s}"
              f"   decode only: {'seek ms':>8s} {'every frame ms':>15s} {'ratio':>6s}")  # fmt: skip
        for name, sampling in (("--fps 1", Sampling()), ("--frames 8", Sampling(fps=None, frames=8))):
            decoder = Decoder(scorer.transform, None, scorer.video_transform, sampling)
            rows = [decoder.rows(Sample(c.name, path=str(c), video=True))[0] for c in clips]
            assert all(r.error is None for r in rows), [r.error for r in rows]
            frames = rows[0].frames
            prep = best_seconds(
                lambda d=decoder: [d.rows(Sample(c.name, path=str(c), video=True)) for c in clips], args.repeat
            )
            visual = [scorer.video_collate([r.visual], 1, torch.float32) for r in rows]
            scorer.score_video_batch(visual[0])  # warm-up
            model = best_seconds(lambda v=visual: [scorer.score_video_batch(x) for x in v], args.repeat)
            seek = best_seconds(lambda s=sampling: [load_video(c, s) for c in clips], args.repeat)
            every = best_seconds(lambda s=sampling: [load_video(c, s, seek=False) for c in clips], args.repeat)
            n = len(clips)
            print(f"{name:14s} {frames:6d} {1000 * prep / n:15.1f} {1000 * model / n:9.1f} {n / (prep + model):9.2f}"
                  f"                {1000 * seek / n:8.1f} {1000 * every / n:15.1f} {every / seek:5.2f}x")  # fmt: skip
        print(
            "decode+prep: load_video (seeking) plus the frames' preprocessing, per video; model: the video call of "
            "the tiny model, per video; videos/s = 1 / (decode+prep + model) in one process (iqa score overlaps the "
            "two with --workers)"
        )


if __name__ == "__main__":
    main()
