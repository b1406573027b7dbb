"""CPU cost per image of the mPLUG-Owl2 preprocessing steps that `iqa score` workers run, old way vs new, in one
run, interleaved (round-robin over the images, best of `--repeats`), one thread:

`resize`: JPEG decode (`load_image`) + pad + bicubic resize + crop to the 448 px uint8 square. plain: the padded
square through one `Image.resize` (the reference's order); split (`ClipPreprocessor.uint8_pixels`): for
landscape images the horizontal pass on the image's rows only, the padding rows' pass precomputed, then the
vertical pass; for portrait ones (`--size 768x1024`) the square's left part through `box`, the right-hand
padding columns from a cache. Checks the squares are identical. `--fast-decode` adds `iqa score --fast-decode`'s
way (the JPEG decoded at a 1/2-1/8 DCT scale, then torch's resize) and its pixel differences.

`collate`: a worker's items and collate for 16 images (after the resize): float items (the value table into
a float32 [3, S, S] per image, then copied and cast into the batch) vs uint8 items (the value table looked up
straight into the batch), for float32 and bfloat16 batches, in a DataLoader worker with the batch in shared
memory as `iqa score` builds it. CPU time, so the other processes on a busy machine count less. The hand-over
of the finished batch (a shared-memory handle) is the same both ways. Checks the batches are identical.

`pool`: the hand-over itself, as `iqa score` runs it: 2 DataLoader workers build float32 batches of 16 448 px
squares (from memory, so no decoding) and the main process reads each one; fresh: a new shared-memory block per
batch (before); pooled: the workers reuse their blocks once the main process released the batch (`BatchPool`).
The two alternate; CPU time of the workers and the main process per image, wall time, and the blocks allocated.

    .venv/bin/python benchmarks/bench_preprocess.py resize [--images 64] [--repeats 3] [--size 1024x768] [--fast-decode]
    .venv/bin/python benchmarks/bench_preprocess.py collate [--batches 20] [--repeats 3]
    .venv/bin/python benchmarks/bench_preprocess.py pool [--images 1600] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
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
from iqa_cli.models.mplug_owl2.backbone import PIXELS, SquareCollate
from iqa_cli.models.mplug_owl2.preprocess import ClipPreprocessor, expand_to_square
from iqa_cli.process import quiet_torchao_notice
from iqa_cli.scoring.loader import PREFETCH, PadCollate, batch_pool, worker_init
from iqa_cli.sources import Sample

quiet_torchao_notice()  # transformers imports torchao when installed: two notice lines per run


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
    size = tuple(int(v) for v in args.size.split("x"))
    paths = make_jpegs(work, args.images, size=size)
    ways = {
        "plain": lambda path: plain_square(pre, load_image(path)),
        "split": lambda path: pre.uint8_pixels(load_image(path)),
    }
    if args.fast_decode:
        ways["fast"] = lambda path: pre.uint8_pixels(load_image(path, draft=pre.draft_size), fast=True)
    differences = []
    best = {name: float("inf") for name in ways}
    for repeat in range(args.repeats):
        seconds = dict.fromkeys(ways, 0.0)
        for path in paths:
            order = list(ways) if repeat % 2 == 0 else list(ways)[::-1]
            out = {}
            for name in order:
                start = time.perf_counter()
                out[name] = ways[name](path)
                seconds[name] += time.perf_counter() - start
            assert np.array_equal(out["plain"], out["split"]), path
            if args.fast_decode and repeat == 0:
                differences.append(np.abs(out["fast"].astype(np.int16) - out["split"]))
        for name in ways:
            best[name] = min(best[name], seconds[name])
    n = len(paths)
    print(f"{n} generated {args.size} JPEGs, decode + pad + resize + crop to 448 px uint8, one thread, best of "
          f"{args.repeats}; squares identical: yes")  # fmt: skip
    for name in ways:
        print(f"  {name:6s} {1000 * best[name] / n:6.2f} ms/image")
    print(f"  split vs plain: {best['plain'] / best['split']:.3f}x")
    if args.fast_decode:
        d = np.stack(differences)
        print(f"  fast vs plain: {best['plain'] / best['fast']:.3f}x; fast vs exact pixels: mean |difference| "
              f"{d.mean():.2f} grey levels, 99th percentile {np.percentile(d, 99):.0f}, max {d.max()}")  # fmt: skip


def float_item(pre: ClipPreprocessor, hwc: np.ndarray) -> dict[str, torch.Tensor]:
    """What the transform handed over before: `ClipPreprocessor.pixels`' float32 [3, S, S] after the resize."""
    lut = pre.value_table()
    out = np.empty((3, *hwc.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.take(lut[c], hwc[..., c], out=out[c])
    return {PIXELS: torch.from_numpy(out)}


class InWorker(torch.utils.data.Dataset):
    """One item whose loading is the whole measurement, so that it runs in a DataLoader worker (batch buffers in
    shared memory, one thread) as `iqa score`'s loading does."""

    def __init__(self, batches: int, repeats: int):
        self.batches, self.repeats = batches, repeats

    def __len__(self) -> int:
        return 1

    def __getitem__(self, _: int) -> dict:
        pre = ClipPreprocessor()
        collate = SquareCollate(448, pre)
        rng = np.random.default_rng(0)
        squares = [rng.integers(0, 256, (448, 448, 3), dtype=np.uint8) for _ in range(16)]
        ways = {
            "float items": lambda dtype: collate([float_item(pre, hwc) for hwc in squares], 16, dtype),
            "uint8 items": lambda dtype: collate([{PIXELS: torch.from_numpy(hwc)} for hwc in squares], 16, dtype),
        }
        results = {}
        for dtype in (torch.float32, torch.bfloat16):
            cpu = {name: [] for name in ways}
            for i in range(self.batches * self.repeats):
                order = list(ways) if i % 2 == 0 else list(ways)[::-1]
                batches = {}
                for name in order:
                    start = time.process_time()
                    batches[name] = ways[name](dtype)[PIXELS]
                    cpu[name].append(time.process_time() - start)
                bits = torch.int16 if dtype.itemsize == 2 else torch.int32
                assert torch.equal(batches["float items"].view(bits), batches["uint8 items"].view(bits))
                assert batches["uint8 items"].is_shared()
            results[str(dtype)] = {name: float(np.median(t)) / 16 for name, t in cpu.items()}
        return results


def bench_collate(args: argparse.Namespace) -> None:
    loader = torch.utils.data.DataLoader(InWorker(args.batches, args.repeats), batch_size=None, num_workers=1)
    results = next(iter(loader))
    print(f"batches of 16 448 px squares built in a DataLoader worker (shared memory, one thread), old and new "
          f"alternating, {args.batches * args.repeats} batches each; median CPU time of the worker per image "
          f"(items + collate); batches identical bit for bit: yes")  # fmt: skip
    for dtype, ms in results.items():
        old, new = ms["float items"], ms["uint8 items"]
        print(f"  {dtype:15s} float items {1000 * old:5.2f} ms/image, uint8 items {1000 * new:5.2f} ms/image: "
              f"{old / new:.2f}x")  # fmt: skip


class Squares(torch.utils.data.Dataset):
    """`n` items as the loader's `Decoder` gives them: uint8 squares (16 distinct ones, from memory)."""

    def __init__(self, n: int):
        rng = np.random.default_rng(0)
        self.n, self.squares = n, [rng.integers(0, 256, (448, 448, 3), dtype=np.uint8) for _ in range(16)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        return 0, i, Sample(str(i)), ({PIXELS: torch.from_numpy(self.squares[i % 16])}, 448, 448, None)


class UnitCollate:
    """`PadCollate` over items that came one by one (the loader's `UnitStream` builds whole batches itself)."""

    def __init__(self, collate: PadCollate):
        self.collate = collate

    def __call__(self, items: list[tuple]) -> dict:
        return self.collate(items, [])


def _pool_run(images: int, pooled: bool) -> dict[str, float]:
    pool = batch_pool(2, PREFETCH) if pooled else None
    loader = torch.utils.data.DataLoader(
        Squares(images),
        batch_size=16,
        num_workers=2,
        collate_fn=UnitCollate(PadCollate(16, SquareCollate(448, ClipPreprocessor()), torch.float32, pool)),
        worker_init_fn=worker_init,
        prefetch_factor=PREFETCH,
    )
    own, children, start = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
        time.perf_counter(),
    )
    blocks = 0
    batches = iter(loader)
    for batch in batches:
        float(batch["visual"][PIXELS].sum())  # the main process reads the batch, as the model does
        blocks += batch["pool_stamp"][2] if pooled else 1
        if pool is not None:
            pool.release(batch)
    del batches  # joins the workers, so their CPU time is counted
    wall = time.perf_counter() - start
    own_end, children_end = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)

    def ms(a, b):
        return 1000 * (b.ru_utime - a.ru_utime + b.ru_stime - a.ru_stime) / images

    return {"workers": ms(children, children_end), "main": ms(own, own_end), "wall": wall, "blocks": blocks}


def bench_pool(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict[str, float]]] = {"fresh": [], "pooled": []}
    for repeat in range(args.repeats):
        for name in ("fresh", "pooled") if repeat % 2 == 0 else ("pooled", "fresh"):
            runs[name].append(_pool_run(args.images, name == "pooled"))
    print(f"{args.images} images in float32 batches of 16 (448 px), 2 workers, the main process reading each batch; "
          f"fresh and pooled alternating, best of {args.repeats} (by workers' CPU)")  # fmt: skip
    best = {name: min(r, key=lambda x: x["workers"]) for name, r in runs.items()}
    for name, r in best.items():
        print(f"  {name:7s} workers {r['workers']:5.2f} ms/image CPU, main {r['main']:5.2f} ms/image CPU, "
              f"wall {r['wall']:5.2f} s, blocks allocated {r['blocks']}")  # fmt: skip
    f, p = best["fresh"], best["pooled"]
    print(f"  pooled vs fresh: workers {f['workers'] / p['workers']:.2f}x, main {f['main'] / p['main']:.2f}x, "
          f"wall {f['wall'] / p['wall']:.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    resize = sub.add_parser("resize")
    resize.add_argument("--images", type=int, default=64)
    resize.add_argument("--repeats", type=int, default=3)
    resize.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the generated JPEGs")
    resize.add_argument("--fast-decode", action="store_true", help="also time --fast-decode's decoding")
    collate = sub.add_parser("collate")
    collate.add_argument("--batches", type=int, default=20)
    collate.add_argument("--repeats", type=int, default=3)
    pool = sub.add_parser("pool")
    pool.add_argument("--images", type=int, default=1600)
    pool.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    {"resize": bench_resize, "collate": bench_collate, "pool": bench_pool}[args.mode](args)


if __name__ == "__main__":
    main()
