"""The demo's images as videos and as an AVA release, for README's video and aesthetics examples (after `iqa demo`).

    python -c "from iqa_cli.demo_media import write_clips; write_clips('iqa-demo')"
    python -c "from iqa_cli.demo_media import write_ava; write_ava('iqa-demo')"

`write_clips`: clips of 8 frames at 2 fps, each made of 8 demo images of neighbouring quality (the demo's images
sorted by MOS), with their mean MOS and std in `clips/scores.csv` (needs PyAV: `pip install 'iqa-cli[video]'`).
`write_ava`: `ava/AVA.txt` in the official layout (index, image ID, the counts of the ratings 1..10, two tags, the
challenge) for demo images saved as `ava/images/<ID>.jpg`, each with 210 votes drawn around its MOS on AVA's 1..10
scale.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from iqa_cli.synthetic import MOS_RANGE


def _rows(demo: Path) -> list[dict[str, str]]:
    with open(demo / "data" / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_clips(demo: str | Path, count: int = 40, frames: int = 8) -> Path:
    """`count` .mp4 clips in `<demo>/clips` and their `scores.csv` (video, mos, std); returns the CSV's path."""
    import av
    from PIL import Image

    demo = Path(demo)
    rows = sorted(_rows(demo), key=lambda r: float(r["mos"]))
    out = demo / "clips"
    out.mkdir(exist_ok=True)
    table = ["video,mos,std"]
    step = len(rows) // count
    for c in range(count):
        group = rows[c * step : c * step + frames]
        pictures = []
        for r in group:
            with Image.open(demo / "data" / "images" / r["image"]) as image:
                pictures.append(np.asarray(image.convert("RGB")))
        with av.open(str(out / f"clip{c:02d}.mp4"), "w") as video:
            stream = video.add_stream("libx264", rate=2)
            stream.height, stream.width = pictures[0].shape[:2]
            stream.pix_fmt = "yuv420p"
            for picture in pictures:
                for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                    video.mux(packet)
            for packet in stream.encode():
                video.mux(packet)
        mos, std = np.mean([float(r["mos"]) for r in group]), np.mean([float(r["std"]) for r in group])
        table.append(f"clip{c:02d}.mp4,{mos:.4f},{std:.4f}")
    (out / "scores.csv").write_text("\n".join(table) + "\n")
    return out / "scores.csv"


def write_ava(demo: str | Path, count: int = 400, seed: int = 0) -> Path:
    """`<demo>/ava/AVA.txt` and `<demo>/ava/images/<ID>.jpg` for the first `count` demo images; returns AVA.txt."""
    from PIL import Image

    demo = Path(demo)
    out = demo / "ava"
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lo, hi = MOS_RANGE  # of the demo's scores.csv
    lines = []
    for i, r in enumerate(_rows(demo)[:count]):
        mean = 1 + (float(r["mos"]) - lo) * 9 / (hi - lo)  # the demo's MOS on AVA's 1..10 scale
        ratings = np.clip(np.rint(rng.normal(mean, 1.4, 210)), 1, 10).astype(int)
        votes = np.bincount(ratings - 1, minlength=10)
        image_id = 500000 + i
        with Image.open(demo / "data" / "images" / r["image"]) as image:
            image.convert("RGB").save(out / "images" / f"{image_id}.jpg")
        lines.append(f"{i + 1} {image_id} {' '.join(map(str, votes))} 0 0 1000")
    (out / "AVA.txt").write_text("\n".join(lines) + "\n")
    return out / "AVA.txt"
