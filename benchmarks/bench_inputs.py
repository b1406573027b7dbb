"""Throughput of shard and Parquet inputs against the folder input on the same images, and listing time.

`score`: N generated JPEGs (default 480 at 640x480) are written three ways: a folder of files, WebDataset
shards (`--per-shard` images each, img2dataset layout with .txt/.json members), and Parquet files of
`{bytes, path}` structs (Hugging Face layout, row groups of `--row-group`). `score_images` scores each with the
tiny random mPLUG-Owl2 checkpoint at 448 px (so decoding and preprocessing are the real per-image work and
the model is cheap: what is measured is the input side), loaded once outside the timing, in rounds that
alternate the three inputs; it prints the best images/s of each and the ratios to the folder, and checks that
all three give the same scores.

`score --loader-only`: the input side alone (decode, CLIP preprocessing at 448 px, batching) in this process
without a model, the three inputs alternating over `--rounds`: what shards and Parquet cost over files.

`list`: writes `--shards` small tars (default 1,000) and times `open_inputs` on the brace pattern, the glob and
a list file (best of `--repeats`), then the same with `--keep` (which reads the first shard's first sample).

    .venv/bin/python benchmarks/bench_inputs.py score [--images 480] [--rounds 5] [--workers 2]
    .venv/bin/python benchmarks/bench_inputs.py score --loader-only [--images 480] [--rounds 5]
    .venv/bin/python benchmarks/bench_inputs.py list [--shards 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.factories, when run as a script

from iqa_cli.process import quiet_torchao_notice
from iqa_cli.scoring.config import ScoreConfig
from iqa_cli.scoring.driver import score_images
from iqa_cli.sources import SourceOptions, open_inputs

quiet_torchao_notice()  # transformers imports torchao when installed: two notice lines per run


def _machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f}"


def _jpegs(n: int, width: int, height: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        pixels = np.roll(base, 7 * i, axis=1) // (1 + i % 3)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_inputs(root: Path, images: list[bytes], per_shard: int, row_group: int) -> dict[str, list[str]]:
    files, shards, tables = root / "files", root / "shards", root / "tables"
    for folder in (files, shards, tables):
        folder.mkdir(parents=True)
    keys = [f"{i:09d}" for i in range(len(images))]
    for key, data in zip(keys, images, strict=True):
        (files / f"{key}.jpg").write_bytes(data)
    for s, start in enumerate(range(0, len(images), per_shard)):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for key, data in zip(keys[start : start + per_shard], images[start : start + per_shard], strict=True):
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.txt", f"caption of {key}".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "url": f"https://example.com/{key}.jpg"}).encode())
    half = len(images) // 2
    for p, (lo, hi) in enumerate([(0, half), (half, len(images))]):
        struct = pa.array(
            [{"bytes": images[i], "path": f"{keys[i]}.jpg"} for i in range(lo, hi)],
            type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
        pq.write_table(pa.table({"image": struct}), tables / f"train-{p:05d}.parquet", row_group_size=row_group)
    return {"folder": [str(files)], "shards": [f"{shards}/*.tar"], "parquet": [f"{tables}/*.parquet"]}


def bench_score(args: argparse.Namespace) -> None:
    import torch

    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
    from iqa_cli.scoring.scorer import Scorer
    from tests.factories import tiny_config, tiny_model, write_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-inputs-") as tmp:
        root = Path(tmp)
        images = _jpegs(args.images, args.width, args.height)
        inputs = write_inputs(root, images, args.per_shard, args.row_group)
        config = tiny_config(image_size=args.image_size)
        checkpoint = write_checkpoint(
            tiny_model(seed=0, config=config), root / "model", tokenizer_dir=build_tiny_tokenizer(root / "tok")
        )
        scorer = Scorer.from_pretrained(checkpoint.path, device="cpu", dtype="float32")
        rates: dict[str, list[float]] = {}
        scores: dict[str, np.ndarray] = {}
        print(
            f"{args.images} JPEGs {args.width}x{args.height}, {args.per_shard} per shard, row groups of "
            f"{args.row_group}; tiny model at {args.image_size} px; workers {args.workers}; torch "
            f"{torch.__version__}; {_machine()}"
        )
        for r in range(args.rounds):
            for name, paths in inputs.items():
                out = root / f"out-{name}-{r}.parquet"
                cfg = ScoreConfig(out=out, inputs=paths, batch_size=args.batch_size, workers=args.workers, quiet=True)
                start = time.perf_counter()
                summary = score_images(cfg, scorer_factory=lambda device: scorer)
                seconds = time.perf_counter() - start
                rate = summary.total / seconds
                rates.setdefault(name, []).append(rate)
                frame = pd.read_parquet(out)
                scores[name] = frame.sort_values("image")["score"].to_numpy()
                print(f"  round {r + 1}: {name:8s} {summary.total} images in {seconds:6.2f} s  {rate:7.1f} images/s")
        print("images/s end to end (listing, workers' start, the output file included), best and median of rounds:")
        best = {name: max(r) for name, r in rates.items()}
        median = {name: float(np.median(r)) for name, r in rates.items()}
        for name in rates:
            print(
                f"  {name:8s} best {best[name]:7.1f} ({best[name] / best['folder']:.3f}x the folder)   "
                f"median {median[name]:7.1f} ({median[name] / median['folder']:.3f}x)"
            )
        diff = max(float(np.abs(scores[n] - scores["folder"]).max()) for n in ("shards", "parquet"))
        print(f"largest score difference to the folder: {diff:.2e}")


def bench_loader(args: argparse.Namespace) -> None:
    """The input side alone: decode + CLIP preprocessing at 448 px + batching, in this process, no model."""

    from iqa_cli.images import load_image
    from iqa_cli.models.mplug_owl2.backbone import ClipTransform, SquareCollate
    from iqa_cli.models.mplug_owl2.preprocess import ClipPreprocessor
    from iqa_cli.scoring.loader import Decoder, PadCollate, UnitStream

    preprocessor = ClipPreprocessor(size=args.image_size, crop_size=(args.image_size, args.image_size))
    decode = Decoder(ClipTransform(preprocessor), load_image)
    collate = PadCollate(args.batch_size, SquareCollate(args.image_size, preprocessor))
    with tempfile.TemporaryDirectory(prefix="bench-inputs-") as tmp:
        inputs = write_inputs(Path(tmp), _jpegs(args.images, args.width, args.height), args.per_shard, args.row_group)

        def units(name: str) -> int:
            source = open_inputs(inputs[name], SourceOptions())
            every = np.arange(len(source))
            stream = UnitStream(source, every, np.zeros_like(every), decode, collate)
            return sum(int((b["unit"] >= 0).sum()) for b in stream)

        cases = {name: (lambda name=name: units(name)) for name in ("folder", "shards", "parquet")}
        rates: dict[str, list[float]] = {}
        print(
            f"loader only: {args.images} JPEGs {args.width}x{args.height} -> {args.image_size} px batches of "
            f"{args.batch_size}, one process; {_machine()}"
        )
        for _ in range(args.rounds):
            for name, run in cases.items():
                start = time.perf_counter()
                n = run()
                rates.setdefault(name, []).append(n / (time.perf_counter() - start))
        for name, r in rates.items():
            print(
                f"  {name:8s} best {max(r):7.1f} images/s ({max(r) / max(rates['folder']):.3f}x the folder)   "
                f"median {np.median(r):7.1f} ({np.median(r) / np.median(rates['folder']):.3f}x)"
            )


def bench_list(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-list-") as tmp:
        root = Path(tmp) / "shards"
        root.mkdir()
        image = _jpegs(1, 64, 48)[0]
        for s in range(args.shards):
            with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
                for i in range(4):
                    _add(tar, f"{s:05d}{i:04d}.jpg", image)
                    _add(tar, f"{s:05d}{i:04d}.json", b'{"url": "u"}')
        listing = Path(tmp) / "shards.txt"
        listing.write_text("".join(f"{root}/{s:05d}.tar\n" for s in range(args.shards)))
        last = f"{args.shards - 1:05d}"
        print(f"{args.shards} shards of 4 samples; {_machine()}")
        cases = {
            "brace": dict(paths=[f"{root}/{{00000..{last}}}.tar"]),
            "glob": dict(paths=[f"{root}/*.tar"]),
            "list file": dict(from_file=listing),
            "glob + --keep": dict(paths=[f"{root}/*.tar"], keep=["url"]),
        }
        for name, kwargs in cases.items():
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                options = SourceOptions(from_file=kwargs.get("from_file"), keep=kwargs.get("keep", []))
                units = open_inputs(kwargs.get("paths", ()), options)
                times.append(time.perf_counter() - start)
            assert len(units) == args.shards
            print(f"  {name:14s} best {min(times) * 1e3:7.1f} ms  median {np.median(times) * 1e3:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    score = sub.add_parser("score")
    score.add_argument("--images", type=int, default=480)
    score.add_argument("--width", type=int, default=640)
    score.add_argument("--height", type=int, default=480)
    score.add_argument("--per-shard", type=int, default=48)
    score.add_argument("--row-group", type=int, default=100)
    score.add_argument("--image-size", type=int, default=448)
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--workers", type=int, default=2)
    score.add_argument("--rounds", type=int, default=5)
    listing = sub.add_parser("list")
    listing.add_argument("--shards", type=int, default=1000)
    listing.add_argument("--repeats", type=int, default=5)
    score.add_argument("--loader-only", action="store_true", help="time the input side alone, no model")
    args = parser.parse_args()
    if args.mode == "list":
        bench_list(args)
    else:
        bench_loader(args) if args.loader_only else bench_score(args)


if __name__ == "__main__":
    main()
