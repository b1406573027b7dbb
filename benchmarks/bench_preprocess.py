"""CPU cost per image of the mPLUG-Owl2 preprocessing steps that `iqa score` workers run, old way vs new, in one
run, interleaved (round-robin over the images, best of `--repeats`), one thread:

`resize`: JPEG decode (`load_image`) + pad + bicubic resize + crop to the 448 px uint8 square. plain: the padded
square through one `Image.resize` (the reference's order); split (`ClipPreprocessor.uint8_pixels`): the
horizontal pass on the image's rows only, the padding rows' pass precomputed, then the vertical pass. Checks
the squares are identical.

    .venv/bin/python benchmarks/bench_preprocess.py resize [--images 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_score import make_jpegs
from iqa_cli.images import load_image
from iqa_cli.models.mplug_owl2.preprocess import ClipPreprocessor, expand_to_square


def plain_square(pre: ClipPreprocessor, image: Image.Image) -> np.ndarray:
    square = expand_to_square(image, pre.pad_color)
    height, width = pre.resize_shape(square.size)
    resized = np.asarray(square.resize((width, height), resample=Image.Resampling(pre.resample)))
    crop_h, crop_w = pre.crop_size
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return resized[top : top + crop_h, left : left + crop_w]


def bench_resize(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    pre = ClipPreprocessor()
    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    paths = make_jpegs(work, args.images)
    ways = {"plain": lambda image: plain_square(pre, image), "split": pre.uint8_pixels}
    best = {name: float("inf") for name in ways}
    for repeat in range(args.repeats):
        seconds = dict.fromkeys(ways, 0.0)
        for path in paths:
            order = list(ways) if repeat % 2 == 0 else list(ways)[::-1]
            out = {}
            for name in order:
                start = time.perf_counter()
                out[name] = ways[name](load_image(path))
                seconds[name] += time.perf_counter() - start
            assert np.array_equal(out["plain"], out["split"]), path
        for name in ways:
            best[name] = min(best[name], seconds[name])
    n = len(paths)
    print(f"{n} generated 1024x768 JPEGs, decode + pad + resize + crop to 448 px uint8, one thread, best of "
          f"{args.repeats}; squares identical: yes")  # fmt: skip
    for name in ways:
        print(f"  {name:6s} {1000 * best[name] / n:6.2f} ms/image")
    print(f"  split vs plain: {best['plain'] / best['split']:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    resize = sub.add_parser("resize")
    resize.add_argument("--images", type=int, default=64)
    resize.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bench_resize(args)


if __name__ == "__main__":
    main()
