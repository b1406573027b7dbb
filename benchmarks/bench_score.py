"""Throughput of `iqa score`: the streaming pipeline against the reference's naive loop, and the model on a GPU.

`cpu` (default): a tiny random mPLUG-Owl2 (written as a released-layout checkpoint, loaded with
`Scorer.from_pretrained`) scores generated 1024x768 JPEGs on the CPU, in one run, two ways:

- naive: what the reference `src/evaluate/scorer.py` does, one batch of 16 at a time in the main process:
  `Image.open(...).convert("RGB")` -> `expand2square` -> transformers' `CLIPImageProcessor` -> model;
- ours: `iqa_cli.scoring.pipeline.score_images` (DataLoader workers decoding and preprocessing, parts, merge, output).

It prints images/s and the peak memory (PSS of the process and its workers, sampled) of each, the scores'
largest difference, and the decode + preprocess rate of one worker (one process, one thread). The tiny model
reads 448 px images like the real one (`--image-size`), so the per-image CPU work is the real workload's.

`gpu`: the full-size mPLUG-Owl2 7B with random weights in bf16 (`Scorer` around an in-memory model: nothing
is downloaded), `score_pixels` on 448 px inputs at batch sizes 1..256: images/s, latency per call, peak GPU
memory and model FLOPs utilisation (FLOPs per image counted by `torch.utils.flop_counter` on one forward;
peak bf16 dense FLOP/s from the device name or `--peak-tflops`). Then the whole pipeline (JPEG files ->
workers -> model -> Parquet) at the best batch size, to show whether decoding keeps up.
`gpu --dry-run` runs the same code on the CPU with the tiny config (a smoke test of this script).

`small`: short runs (default 2 and 16 images) end to end through `score_images` with `--batch-size auto`,
as a user's `iqa score` (the checkpoint loaded once, outside the timing). "padded" is what `iqa score` did
before it sized the batch from the run: every model call padded to the full batch (16 rows on the CPU),
reproduced by a scorer wrapper that pads each call to that size; "sized" is the current code. Both in
the same process, interleaved, best of `--repeats`; it prints the rows per model call, seconds end to end
and inside model calls, and the largest score difference between the two.

    .venv/bin/python benchmarks/bench_score.py cpu [--images 256] [--workers 2] [--batch-size 16]
    .venv/bin/python benchmarks/bench_score.py gpu [--batch-sizes 1,2,4,8,16,32,64,128,256] [--pipeline-images 4096]
    .venv/bin/python benchmarks/bench_score.py gpu --dry-run
    .venv/bin/python benchmarks/bench_score.py small [--counts 2,16] [--repeats 5] [--patch-size 14]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.factories, when run as a script

from iqa_cli.images import load_image
from iqa_cli.models.mplug_owl2.preprocess import ClipPreprocessor
from iqa_cli.scoring.pipeline import ScoreConfig, score_images

# bf16 dense peak of the GPUs this is likely to meet (vendor data sheets, without sparsity), in TFLOP/s.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4,
                    "A100": 312.0, "L40S": 362.0, "A6000": 154.8, "4090": 165.2}  # fmt: skip
# The default DeQA-Score prompt's ids and the five level words' ids with the real LLaMA-2 tokenizer
# (fixtures/README.md); any ids give the same amount of work.
PROMPT_IDS_7B = (1, 3148, 1001, 29901, 1128, 723, 366, 6554, 278, 11029, 310, 445, 1967, 29973, 13, -200,
                 29871, 319, 1799, 9047, 13566, 29901, 450, 11029, 310, 278, 1967, 338)  # fmt: skip
LEVEL_IDS_7B = (4319, 6460, 6534, 1781, 15129)


# ---------------------------------------------------------------------------------------------------
# Inputs and measuring


def make_jpegs(folder: Path, n: int, size: tuple[int, int] = (1024, 768), seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields plus fine noise, quality 90; about 150-250 kB each)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


class PeakMemory:
    """Samples the memory of this process and its children; `peak_mib` is the largest sum seen.

    PSS (proportional set size) where psutil can read it, so pages shared between the main process and the
    DataLoader workers count once; RSS otherwise.
    """

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak = 0
        self.kind = "RSS"
        self._stop = threading.Event()

    def _sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", None) or info.rss
                self.kind = "PSS" if hasattr(info, "pss") else "RSS"
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        try:
            import psutil  # noqa: F401
        except ImportError:
            self.kind = "unavailable (pip install psutil)"
            return self
        self.peak = self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


@contextmanager
def timed():
    box = {}
    start = time.perf_counter()
    yield box
    box["seconds"] = time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------
# The reference's way


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """The reference's padding (DeQA-Score `src/evaluate/scorer.py`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def naive_loop(scorer, processor, paths: list[Path], batch_size: int = 16) -> np.ndarray:
    """Open, pad, CLIP-process and score one batch at a time in this process, as the reference does."""
    background = tuple(int(x * 255) for x in processor.image_mean)
    scores = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            images = [
                expand2square(Image.open(p).convert("RGB"), background) for p in paths[start : start + batch_size]
            ]
            pixels = processor.preprocess(images, return_tensors="pt")["pixel_values"]
            scores.append(scorer.score_pixels(pixels).score.numpy())
    return np.concatenate(scores)


def decode_rate(paths: list[Path], preprocess, n: int) -> float:
    """Images/s of `load_image` + preprocessing in one process on one thread: what one worker sustains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for path in paths[:n]:
            preprocess(load_image(path))
        return n / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def _decode_worker(job: tuple[list[Path], ClipPreprocessor]) -> float:
    paths, preprocess = job
    return decode_rate(paths, preprocess, len(paths))


def parallel_decode_rate(paths: list[Path], preprocess, processes: int, n: int) -> float:
    """Total images/s of `processes` processes decoding at once: the ceiling of the pipeline on this machine."""
    import multiprocessing

    jobs = [(paths[i:n:processes], preprocess) for i in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        start = time.perf_counter()
        pool.map(_decode_worker, jobs)
        return n / (time.perf_counter() - start)


def hf_rate(paths: list[Path], processor, n: int) -> float:
    background = tuple(int(x * 255) for x in processor.image_mean)
    start = time.perf_counter()
    for path in paths[:n]:
        processor.preprocess([expand2square(Image.open(path).convert("RGB"), background)], return_tensors="pt")
    return n / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------
# cpu


def tiny_checkpoint(directory: Path, image_size: int, patch_size: int | None = None):
    """The tiny test model reading `image_size` px; 2x2 patches unless `patch_size` (14: the real 32x32 grid)."""
    from iqa_cli.synthetic import build_tiny_tokenizer
    from tests.factories import tiny_model, write_checkpoint

    overrides = {}
    if image_size != 28 or patch_size:  # by default 2x2 patches image_size / 2 wide: a cheap model, real pixels
        patch = patch_size or image_size // 2
        overrides = {"vision": {"image_size": image_size, "patch_size": patch}}
        overrides["abstractor"] = {"grid_size": image_size // patch}
    tokenizer = build_tiny_tokenizer(directory / "tokenizer")
    return write_checkpoint(tiny_model(seed=0, **overrides), directory / "model", tokenizer_dir=tokenizer)


def bench_cpu(args: argparse.Namespace) -> None:
    import transformers
    from transformers import CLIPImageProcessor

    from iqa_cli.scoring.scorer import Scorer

    transformers.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="bench_score_"))
    print(f"generating {args.images} JPEGs 1024x768 in {work} ...", flush=True)
    paths = make_jpegs(work / "images", args.images)
    size_kb = np.mean([p.stat().st_size for p in paths]) / 1024
    ckpt = tiny_checkpoint(work, args.image_size)
    scorer = Scorer.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    processor = CLIPImageProcessor.from_pretrained(ckpt.path)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads; tiny model at {scorer.preprocessor.image_size} px;"
        f" JPEGs {size_kb:.0f} kB mean"
    )
    naive_loop(scorer, processor, paths[:16])  # warm caches and allocator

    results = {}
    for repeat in range(args.repeats):
        with PeakMemory() as memory, timed() as t:
            naive_scores = naive_loop(scorer, processor, paths)
        results.setdefault("naive", []).append((t["seconds"], memory.peak_mib, memory.kind))
        out = work / f"ours_{repeat}.parquet"
        config = ScoreConfig(
            out=out,
            inputs=[str(work / "images")],
            batch_size=args.batch_size,
            workers=args.workers,
            device="cpu",
            dtype="float32",
            quiet=True,
        )
        with PeakMemory() as memory, timed() as t:
            summary = score_images(config, scorer_factory=lambda device: scorer)
        results.setdefault("ours", []).append((t["seconds"], memory.peak_mib, memory.kind, summary.seconds))

    import pyarrow.parquet as pq

    ours_scores = pq.read_table(out, columns=["score"]).column(0).to_numpy()
    diff = float(np.abs(ours_scores - naive_scores).max())
    n = len(paths)
    best_naive = min(results["naive"])
    best_ours = min(results["ours"])
    print(f"\n{n} images, batch size {args.batch_size}, best of {args.repeats}")
    print(f"{'':44s} {'images/s':>9s} {'seconds':>8s} {'peak MiB':>9s}")
    print(f"{'naive loop (reference scorer.py way)':44s} {n / best_naive[0]:9.1f} {best_naive[0]:8.2f} "
          f"{best_naive[1]:9.0f}")  # fmt: skip
    label = f"ours: score_images, {args.workers} workers (end to end)"
    print(f"{label:44s} {n / best_ours[0]:9.1f} {best_ours[0]:8.2f} {best_ours[1]:9.0f}")
    print(f"{'ours: scoring loop only (no merge/output)':44s} {n / best_ours[3]:9.1f} {best_ours[3]:8.2f}")
    print(f"speed-up end to end: {best_naive[0] / best_ours[0]:.2f}x   (memory: {best_ours[2]}, sampled)")
    print(f"largest |score difference| naive vs ours: {diff:.2e}")
    k = min(n, 64)
    print(
        f"decode + preprocess, one process one thread: ours {decode_rate(paths, scorer.preprocessor, k):.1f} "
        f"images/s per worker; reference (PIL open + expand2square + CLIPImageProcessor) "
        f"{hf_rate(paths, processor, k):.1f} images/s"
    )
    if args.workers > 1:
        total = parallel_decode_rate(paths, scorer.preprocessor, args.workers, min(n, 128))
        print(
            f"decode + preprocess, {args.workers} processes at once: {total:.1f} images/s in total "
            "(the pipeline's ceiling on this machine, model excluded)"
        )


# ---------------------------------------------------------------------------------------------------
# small runs


class PaddedCalls:
    """A scorer whose every model call is padded to `rows` (the batch shape `iqa score` used for any run)."""

    def __init__(self, scorer, rows: int):
        self.scorer, self.rows = scorer, rows
        self.calls: list[int] = []
        self.seconds = 0.0  # in model calls

    def __getattr__(self, name: str):
        return getattr(self.scorer, name)

    def score_batch(self, visual: dict[str, torch.Tensor]):
        from iqa_cli.scoring.pipeline import rows_padded

        visual = {name: rows_padded(t, max(self.rows, t.shape[0])) for name, t in visual.items()}
        self.calls.append(next(iter(visual.values())).shape[0])
        start = time.perf_counter()
        result = self.scorer.score_batch(visual)  # the pipeline keeps the first rows only
        self.seconds += time.perf_counter() - start
        return result


def bench_small(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from iqa_cli.scoring.pipeline import AUTO_BATCH
    from iqa_cli.scoring.scorer import Scorer

    counts = [int(c) for c in args.counts.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_small_"))
    make_jpegs(work / "all", max(counts))
    ckpt = tiny_checkpoint(work, args.image_size, args.patch_size)
    scorer = Scorer.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    workers = "default (one per core, at most 8)" if args.workers is None else args.workers
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads; tiny model at {scorer.preprocessor.image_size} px in "
        f"{(args.image_size // (args.patch_size or args.image_size // 2)) ** 2} patches; 1024x768 JPEGs; "
        f"--batch-size auto ({AUTO_BATCH['cpu']} on the CPU), --workers {workers}"
    )
    rows = AUTO_BATCH["cpu"]
    print(f"{'images':>6s} {'way':>7s} {'rows per call':>14s} {'seconds':>8s} {'images/s':>9s} {'model s':>8s}")
    for n in counts:
        folder = work / f"n{n}"
        folder.mkdir()
        for path in sorted((work / "all").iterdir())[:n]:
            os.link(path, folder / path.name)
        best: dict[str, float] = {}
        model_best: dict[str, float] = {}
        calls: dict[str, list[int]] = {}
        scores: dict[str, np.ndarray] = {}
        for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
            for way in ("padded", "sized") if repeat % 2 else ("sized", "padded"):  # alternate who goes first
                model = PaddedCalls(scorer, rows) if way == "padded" else PaddedCalls(scorer, 0)
                out = work / f"{way}-{n}-{repeat}.parquet"
                config = ScoreConfig(out=out, inputs=[str(folder)], workers=args.workers, device="cpu", quiet=True)
                with timed() as t:
                    score_images(config, scorer_factory=lambda device, model=model: model)
                if repeat:
                    best[way] = min(best.get(way, float("inf")), t["seconds"])
                    model_best[way] = min(model_best.get(way, float("inf")), model.seconds)
                calls[way] = model.calls
                scores[way] = pq.read_table(out, columns=["score"]).column(0).to_numpy()
        for way in ("padded", "sized"):
            shape = ",".join(str(c) for c in sorted(set(calls[way])))
            print(
                f"{n:6d} {way:>7s} {len(calls[way])} x {shape:>10s} {best[way]:8.3f} {n / best[way]:9.1f} "
                f"{model_best[way]:8.3f}"
            )
        diff = float(np.abs(scores["padded"] - scores["sized"]).max())
        print(
            f"{n:6d} speed-up {best['padded'] / best['sized']:.2f}x end to end, "
            f"{model_best['padded'] / model_best['sized']:.2f}x in the model; largest |score difference| {diff:.1e}"
        )


# ---------------------------------------------------------------------------------------------------
# gpu


def random_scorer(tiny: bool, device: torch.device, dtype: torch.dtype):
    """A `Scorer` around a randomly initialised model built directly on `device` (no checkpoint, no download)."""
    from iqa_cli.models.mplug_owl2.backbone import MPLUGOwl2Backbone
    from iqa_cli.models.mplug_owl2.config import MPLUGOwl2Config
    from iqa_cli.models.mplug_owl2.model import MPLUGOwl2ForCausalLM
    from iqa_cli.models.mplug_owl2.tokenizer import DEFAULT_PROMPT
    from iqa_cli.scoring.scorer import Readout, Scorer

    if tiny:
        config = MPLUGOwl2Config.from_name("mplug-owl2-tiny")
        ids, levels = (1, 20, 21, 22, -200, 23, 24, 25), (30, 31, 32, 33, 34)
    else:
        config = MPLUGOwl2Config.from_name("mplug-owl2-7b")
        ids, levels = PROMPT_IDS_7B, LEVEL_IDS_7B
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = MPLUGOwl2ForCausalLM(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    side = config.vision.image_size
    preprocessor = ClipPreprocessor(size=side, crop_size=(side, side))
    names = ("bad", "poor", "fair", "good", "excellent")
    readout = Readout(ids, levels, names, DEFAULT_PROMPT)
    metadata = {
        "model": f"random {'tiny' if tiny else 'mplug-owl2-7b'}",
        "dtype": str(dtype),
        "level_names": str(names),
    }
    return Scorer(MPLUGOwl2Backbone(model, None, preprocessor), readout, metadata), config


def flops_per_image(scorer, side: int, device: torch.device, dtype: torch.dtype) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    pixels = torch.randn(1, 3, side, side, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        scorer.score_pixels(pixels)
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if all(part in name for part in key.split()):
            return value
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_gpu(args: argparse.Namespace) -> None:
    if args.dry_run:
        args.tiny, args.device, args.dtype = True, "cpu", "float32"
        args.batch_sizes, args.iters, args.pipeline_images = "1,2,4", 2, 24
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("the full-size model needs a CUDA device; use --dry-run (tiny config on the CPU)")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    scorer, config = random_scorer(args.tiny, device, dtype)
    side = config.vision.image_size
    params = sum(p.numel() for p in scorer.model.parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    flops = flops_per_image(scorer, side, device, dtype)
    peak = peak_tflops(device, args.peak_tflops)
    print(f"{where}; torch {torch.__version__}; {params / 1e9:.2f} B parameters, {dtype}, {side} px")
    print(f"model FLOPs per image (one forward, torch.utils.flop_counter): {flops / 1e9:,.2f} GFLOP")
    print(f"peak for MFU: {peak if peak else '-'} TFLOP/s (bf16 dense)\n")
    print(f"{'batch':>5s} {'images/s':>9s} {'ms/call':>8s} {'ms/image':>9s} {'peak GiB':>9s} {'MFU':>6s}")
    best = (0.0, 1)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        pixels = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
        try:
            for _ in range(args.warmup):
                scorer.score_pixels(pixels)
            sync(device)
            start = time.perf_counter()
            for _ in range(args.iters):
                scorer.score_pixels(pixels)  # returns CPU tensors: waits for the GPU
            sync(device)
            seconds = (time.perf_counter() - start) / args.iters
        except torch.OutOfMemoryError:
            print(f"{batch:5d} out of memory")
            break
        rate = batch / seconds
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        mfu = f"{100 * flops * rate / (peak * 1e12):5.1f}%" if peak else "    -"
        print(f"{batch:5d} {rate:9.1f} {seconds * 1e3:8.2f} {seconds * 1e3 / batch:9.3f} {memory:9.2f} {mfu}")
        best = max(best, (rate, batch))
        del pixels

    rate, batch = best
    print(f"\nbest: {rate:.1f} images/s at batch size {batch}")
    work = Path(tempfile.mkdtemp(prefix="bench_score_gpu_"))
    paths = make_jpegs(work / "images", args.pipeline_images)
    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    per_worker = decode_rate(paths, scorer.preprocessor, min(len(paths), 64))
    config = ScoreConfig(
        out=work / "scores.parquet",
        inputs=[str(work / "images")],
        batch_size=batch,
        workers=workers,
        device=str(device),
        dtype=args.dtype,
        quiet=True,
    )
    summary = score_images(config, scorer_factory=lambda d: scorer)
    print(
        f"pipeline, {len(paths)} JPEGs 1024x768 -> Parquet, batch {batch}, {workers} workers: "
        f"{summary.images_per_second:.1f} images/s (model alone {rate:.1f}); decode + preprocess "
        f"{per_worker:.1f} images/s per worker (x{workers} = {per_worker * workers:.0f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode")
    cpu = sub.add_parser("cpu")
    cpu.add_argument("--images", type=int, default=256)
    cpu.add_argument("--workers", type=int, default=2)
    cpu.add_argument("--batch-size", type=int, default=16)
    cpu.add_argument("--image-size", type=int, default=448, help="input side of the tiny model (28 or 448)")
    cpu.add_argument("--repeats", type=int, default=2)
    gpu = sub.add_parser("gpu")
    gpu.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128,256")
    gpu.add_argument("--iters", type=int, default=10)
    gpu.add_argument("--warmup", type=int, default=2)
    gpu.add_argument("--device", default="auto")
    gpu.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    gpu.add_argument("--tiny", action="store_true", help="the tiny test config instead of the 7B one")
    gpu.add_argument("--dry-run", action="store_true", help="tiny config on the CPU: checks this script runs")
    gpu.add_argument("--peak-tflops", type=float, default=None)
    gpu.add_argument("--pipeline-images", type=int, default=4096)
    gpu.add_argument("--workers", type=int, default=None)
    small = sub.add_parser("small")
    small.add_argument("--counts", default="2,16", help="images per run")
    small.add_argument("--repeats", type=int, default=5)
    small.add_argument("--workers", type=int, default=None, help="[default: as iqa score]")
    small.add_argument("--image-size", type=int, default=448, help="input side of the tiny model (28 or 448)")
    small.add_argument("--patch-size", type=int, default=14, help="14: 1024 patches at 448 px, as the real model")
    args = parser.parse_args(sys.argv[1:] or ["cpu"])
    if args.mode == "gpu":
        bench_gpu(args)
    elif args.mode == "small":
        bench_small(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
