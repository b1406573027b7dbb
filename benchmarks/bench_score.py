"""Throughput of `iqa score`: the streaming pipeline against the reference's naive loop, and the model on a GPU.

`cpu` (default): a tiny random mPLUG-Owl2 (written as a released-layout checkpoint) scores generated 1024x768
JPEGs on the CPU, 160 and 1,000 of them by default (`--counts`), two ways, alternating:

- reference: what the reference `src/evaluate/scorer.py` does, one batch of 16 at a time in this process, the
  model already loaded (the loop's time only): `Image.open(...).convert("RGB")` -> `expand2square` ->
  transformers' `CLIPImageProcessor` -> model. Its own start-up (import torch + transformers, load) is
  measured once in a fresh process and shown apart;
- iqa score: the CLI itself in a fresh process (benchmarks/score_process.py), launch to exit, split into
  phases: start-up (interpreter, imports, input listing), model load, first batch (workers starting, first
  decodes and forward), steady state (first to last batch: images/s), output (merge, file) and exit.

It prints seconds and images/s of each, the phases and fixed costs of `iqa score`, the speed-up end to end and
at steady state, and the scores' largest difference. The tiny model reads 448 px images like the real one
(`--image-size`), so the per-image CPU work is the real workload's. `--fast-decode` adds `iqa score
--fast-decode` to the alternation (JPEGs decoded at a smaller DCT scale): its speed-up and its scores' difference
from exact decoding.

`gpu`: the full-size mPLUG-Owl2 7B with random weights in bf16 (`Scorer` around an in-memory model: nothing
is downloaded), `score_pixels` on 448 px inputs at batch sizes 1..256: images/s, latency per call, peak GPU
memory and model FLOPs utilisation (FLOPs per image counted by `torch.utils.flop_counter` on one forward;
peak bf16 dense FLOP/s from the device name or `--peak-tflops`). Then the whole pipeline (JPEG files ->
workers -> model -> Parquet) at the best batch size, to show whether decoding keeps up.
`gpu --dry-run` runs the same code on the CPU with the tiny config (a smoke test of this script).

`stages`: the CPU cost per image of each step, one thread (decode, exact and fast resize, the value table,
the model at batch 16; the reference's open/pad/CLIPImageProcessor), and the ceiling they put on `iqa score`'s
steady state: with every core busy, images/s <= cores / (CPU per image), whatever the pipeline does.

`small`: short runs (default 2 and 16 images) end to end through `score_images` with `--batch-size auto`,
as a user's `iqa score` (the checkpoint loaded once, outside the timing). "padded" is what `iqa score` did
before it sized the batch from the run: every model call padded to the full batch (16 rows on the CPU),
reproduced by a scorer wrapper that pads each call to that size; "sized" is the current code. Both in
the same process, interleaved, best of `--repeats`; it prints the rows per model call, seconds end to end
and inside model calls, and the largest score difference between the two.

    .venv/bin/python benchmarks/bench_score.py cpu [--counts 160,1000] [--repeats 2] [--workers 2] [--batch-size 16]
        [--fast-decode]
    .venv/bin/python benchmarks/bench_score.py gpu [--batch-sizes 1,2,4,8,16,32,64,128,256] [--pipeline-images 4096]
    .venv/bin/python benchmarks/bench_score.py gpu --dry-run
    .venv/bin/python benchmarks/bench_score.py small [--counts 2,16] [--repeats 5] [--patch-size 14]
    .venv/bin/python benchmarks/bench_score.py stages [--images 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.factories, when run as a script

from iqa_cli.images import load_image
from iqa_cli.model_options import ModelSpec
from iqa_cli.models.mplug_owl2.preprocess import ClipPreprocessor
from iqa_cli.process import quiet_torchao_notice
from iqa_cli.scoring.config import ScoreConfig
from iqa_cli.scoring.driver import score_images

quiet_torchao_notice()  # transformers imports torchao when installed: two notice lines per run

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


# ---------------------------------------------------------------------------------------------------
# cpu


def tiny_checkpoint(directory: Path, image_size: int, patch_size: int | None = None):
    """The tiny test model reading `image_size` px; 2x2 patches unless `patch_size` (14: the real 32x32 grid)."""
    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
    from tests.factories import tiny_model, write_checkpoint

    overrides = {}
    if image_size != 28 or patch_size:  # by default 2x2 patches image_size / 2 wide: a cheap model, real pixels
        patch = patch_size or image_size // 2
        overrides = {"vision": {"image_size": image_size, "patch_size": patch}}
        overrides["abstractor"] = {"grid_size": image_size // patch}
    tokenizer = build_tiny_tokenizer(directory / "tokenizer")
    return write_checkpoint(tiny_model(seed=0, **overrides), directory / "model", tokenizer_dir=tokenizer)


PHASES = ("start-up", "load", "first batch", "steady", "output", "exit")


def iqa_score_run(
    folder: Path, model: Path, out: Path, args: argparse.Namespace, fast: bool = False
) -> dict[str, float]:
    """`iqa score` in a fresh process (benchmarks/score_process.py) -> seconds per phase, launch to exit.

    start-up: launch to the model load (interpreter, imports, input listing); load; first batch: load end to
    the first batch scored (workers starting, first decodes, first forward); steady: first to last batch;
    output: last batch to `score_images`' return (merge, output file); exit: to the process's end (garbage
    collection, worker shutdown)."""
    marks = out.with_suffix(".marks")
    script = Path(__file__).resolve().with_name("score_process.py")
    command = [sys.executable, str(script), "--folder", str(folder), "--model", str(model), "--out", str(out),
               "--marks", str(marks), "--batch-size", str(args.batch_size), "--workers", str(args.workers)]  # fmt: skip
    command += ["--fast-decode"] if fast else []
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    end = time.time()
    if result.returncode != 0:
        raise SystemExit(f"iqa score failed ({result.returncode}):\n{result.stderr[-3000:]}")
    times: dict[str, list[float]] = {}
    for line in marks.read_text().splitlines():
        name, value = line.split()
        times.setdefault(name, []).append(float(value))
    batches = times["batch"]
    return {
        "start-up": times["load_start"][0] - start,
        "load": times["load_end"][0] - times["load_start"][0],
        "first batch": batches[0] - times["load_end"][0],
        "steady": batches[-1] - batches[0],
        "output": times["output_end"][0] - batches[-1],
        "exit": end - times["output_end"][0],
        "total": end - start,
    }


def reference_start_up(model: Path) -> float:
    """Seconds of a fresh process that imports what the reference loop needs and loads the model and its
    `CLIPImageProcessor` (the loop's own fixed cost; its exit is left out)."""
    code = (
        "import sys, transformers; transformers.logging.set_verbosity_error();"
        " CLIPImageProcessor = getattr(transformers, 'CLIPImageProcessorPil', None) or transformers.CLIPImageProcessor;"
        " from iqa_cli.scoring.scorer import Scorer;"
        " Scorer.from_pretrained(sys.argv[1], device='cpu', dtype='float32');"
        " CLIPImageProcessor.from_pretrained(sys.argv[1]); import time; print(time.time())"
    )
    start = time.time()
    result = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], check=True)  # fmt: skip
    return float(result.stdout.split()[-1]) - start


def bench_cpu(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq
    import transformers

    from iqa_cli.scoring.scorer import Scorer

    transformers.logging.set_verbosity_error()
    # The reference's slow PIL path: CLIPImageProcessorPil in transformers 5.x (CLIPImageProcessor is torchvision's
    # there, other pixels), CLIPImageProcessor itself in 4.x.
    CLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    counts = [int(c) for c in args.counts.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_score_"))
    print(f"generating {max(counts)} JPEGs 1024x768 in {work} ...", flush=True)
    paths = make_jpegs(work / "images", max(counts))
    folders = {}
    for n in counts:  # hard links: the same files, one folder per run size
        folders[n] = work / f"images_{n}"
        folders[n].mkdir()
        for path in paths[:n]:
            os.link(path, folders[n] / path.name)
    size_kb = np.mean([p.stat().st_size for p in paths]) / 1024
    ckpt = tiny_checkpoint(work, args.image_size)
    scorer = Scorer.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    processor = CLIPImageProcessor.from_pretrained(ckpt.path)
    load = os.getloadavg()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads in this process; tiny model at {args.image_size} px; JPEGs "
        f"{size_kb:.0f} kB mean; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        "reference: the reference scorer's loop in this process, model already loaded (loop time only); iqa score: "
        f"the CLI in a fresh process (--device cpu --dtype float32 --batch-size {args.batch_size} --workers "
        f"{args.workers} -q), launch to exit; the two alternate, fastest of {args.repeats} each"
    )
    naive_loop(scorer, processor, paths[:16])  # warm caches and allocator
    ref_fixed = reference_start_up(ckpt.path)
    print(f"reference start-up in a fresh process (import torch + transformers, load model and processor): "
          f"{ref_fixed:.2f} s")  # fmt: skip
    for n in counts:
        reference, ours, fast = [], [], []
        kinds = ["reference", "iqa score"] + (["fast"] if args.fast_decode else [])
        for repeat in range(args.repeats):
            for kind in kinds if repeat % 2 == 0 else kinds[::-1]:
                if kind == "reference":
                    with timed() as t:
                        naive_scores = naive_loop(scorer, processor, sorted(folders[n].glob("*.jpg")))
                    reference.append(t["seconds"])
                elif kind == "fast":
                    fast_out = work / f"fast_{n}_{repeat}.parquet"
                    fast.append(iqa_score_run(folders[n], ckpt.path, fast_out, args, fast=True))
                else:
                    out = work / f"ours_{n}_{repeat}.parquet"
                    ours.append(iqa_score_run(folders[n], ckpt.path, out, args))
        ours_scores = pq.read_table(out, columns=["score"]).column(0).to_numpy()
        diff = float(np.abs(ours_scores - naive_scores).max())
        ref_s = min(reference)
        best = min(ours, key=lambda r: r["total"])
        steady_rate = (n - args.batch_size) / best["steady"] if best["steady"] > 0 else float("nan")
        fixed = best["total"] - best["steady"]
        print(f"\n{n} images, batch size {args.batch_size}")
        print(f"  reference loop  {ref_s:7.2f} s  {n / ref_s:6.1f} images/s   (every run: "
              f"{', '.join(f'{s:.2f}' for s in reference)})")  # fmt: skip
        totals = ", ".join(f"{r['total']:.2f}" for r in ours)
        print(f"  iqa score       {best['total']:7.2f} s  {n / best['total']:6.1f} images/s   (every run: {totals})")
        print("  iqa score phases (s): " + ", ".join(f"{p} {best[p]:.3f}" for p in PHASES))
        print(f"  iqa score fixed costs {fixed:.2f} s (all but steady); steady state {steady_rate:.1f} images/s "
              f"(first to last batch)")  # fmt: skip
        print(f"  speed-up end to end: {ref_s / best['total']:.2f}x vs the reference loop alone, "
              f"{(ref_s + ref_fixed) / best['total']:.2f}x vs the loop plus its start-up; steady state vs the "
              f"reference loop: {steady_rate / (n / ref_s):.2f}x; largest |score difference|: {diff:.2e}")  # fmt: skip
        if fast:
            fast_best = min(fast, key=lambda r: r["total"])
            fast_scores = pq.read_table(fast_out, columns=["score"]).column(0).to_numpy()
            moved = np.abs(fast_scores - ours_scores)
            fast_rate = (n - args.batch_size) / fast_best["steady"] if fast_best["steady"] > 0 else float("nan")
            every = ", ".join(f"{r['total']:.2f}" for r in fast)
            speed_up = f"{ref_s / fast_best['total']:.2f}x, steady state {fast_rate / (n / ref_s):.2f}x"
            print(f"  iqa score --fast-decode {fast_best['total']:7.2f} s (every run: {every}); steady state "
                  f"{fast_rate:.1f} images/s; speed-up end to end vs the reference loop {speed_up}; scores vs exact "
                  f"decoding: max |difference| {moved.max():.4f}, mean {moved.mean():.4f}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# stages: what one image costs, and the bound it sets on a machine's cores


def _per_image_ms(function, items: list, repeats: int) -> float:
    """Best of `repeats` passes over `items`, ms per item, on this process's current thread count."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, (time.perf_counter() - start) / len(items))
    return 1000 * best


def bench_stages(args: argparse.Namespace) -> None:
    """Per-image CPU cost of each step `iqa score` and the reference loop take, one thread, and the ceiling it
    puts on `iqa score`'s steady state: with every core busy, images/s <= cores / (CPU ms per image)."""
    import transformers

    from iqa_cli.scoring.scorer import Scorer

    transformers.logging.set_verbosity_error()
    CLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    work = Path(tempfile.mkdtemp(prefix="bench_stages_"))
    paths = make_jpegs(work / "images", args.images)
    ckpt = tiny_checkpoint(work, args.image_size)
    scorer = Scorer.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    processor = CLIPImageProcessor.from_pretrained(ckpt.path)
    pre = scorer.preprocessor
    background = tuple(int(x * 255) for x in processor.image_mean)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    decoded = [load_image(p) for p in paths]
    drafted = [load_image(p, draft=pre.draft_size) for p in paths]
    squares = [pre.uint8_pixels(image) for image in decoded]
    table = pre.value_table()
    rows = np.empty((3, *squares[0].shape[:2]), dtype=np.float32)
    padded = [expand2square(image, background) for image in decoded]

    def lookup(square):
        for c in range(3):
            np.take(table[c], square[..., c], out=rows[c])

    batch = torch.randn(16, 3, args.image_size, args.image_size)
    r = args.repeats
    ms = {
        "decode (load_image)": _per_image_ms(load_image, paths, r),
        "exact pad + resize + crop (split, Pillow)": _per_image_ms(pre.uint8_pixels, decoded, r),
        "value table into the batch": _per_image_ms(lookup, squares, r),
        "fast decode (DCT 1/2)": _per_image_ms(lambda p: load_image(p, draft=pre.draft_size), paths, r),
        "fast pad + resize + crop (torch)": _per_image_ms(lambda i: pre.uint8_pixels(i, fast=True), drafted, r),
        "reference: open + convert": _per_image_ms(lambda p: Image.open(p).convert("RGB"), paths, r),
        "reference: expand2square": _per_image_ms(lambda i: expand2square(i, background), decoded, r),
        "reference: CLIPImageProcessor (batches of 16)": _per_image_ms(
            lambda b: processor.preprocess(b, return_tensors="pt"),
            [padded[i : i + 16] for i in range(0, len(padded), 16)],
            r,
        )
        / 16,
    }
    with torch.inference_mode():
        for n in (1, threads):
            torch.set_num_threads(n)
            scorer.score_pixels(batch)
            ms[f"model, batch of 16, {n} thread(s)"] = _per_image_ms(scorer.score_pixels, [batch] * 3, r) / 16
    torch.set_num_threads(threads)
    cores = len(os.sched_getaffinity(0))
    print(f"{args.images} generated 1024x768 JPEGs, tiny model at {args.image_size} px; one thread unless said, "
          f"best of {r}; load average {os.getloadavg()[0]:.2f}; {cores} cores")  # fmt: skip
    for name, value in ms.items():
        print(f"  {name:48s} {value:6.2f} ms/image")
    model_1 = ms["model, batch of 16, 1 thread(s)"]
    reference = sum(value for name, value in ms.items() if name.startswith("reference"))
    reference += ms[f"model, batch of 16, {threads} thread(s)"]
    exact_io = ms["decode (load_image)"] + ms["exact pad + resize + crop (split, Pillow)"]
    fast_io = ms["fast decode (DCT 1/2)"] + ms["fast pad + resize + crop (torch)"]
    lut = ms["value table into the batch"]
    print(f"  reference loop, one image after another (its model on {threads} threads): {reference:.2f} ms/image "
          f"= {1000 / reference:.1f} images/s")  # fmt: skip
    for name, work_ms in (("exact", exact_io), ("--fast-decode", fast_io)):
        bound = cores * 1000 / (work_ms + lut + model_1)
        free_model = cores * 1000 / work_ms
        print(f"  iqa score {name}: decode + resize {work_ms:.2f} ms, + lookup + model {work_ms + lut + model_1:.2f} "
              f"ms of CPU per image -> at most {bound:.0f} images/s on {cores} cores ({bound * reference / 1000:.2f}x "
              f"the reference loop); with a free model and lookup {free_model:.0f} images/s "
              f"({free_model * reference / 1000:.2f}x)")  # fmt: skip


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
        from iqa_cli.scoring.runner import rows_padded

        visual = {name: rows_padded(t, max(self.rows, t.shape[0])) for name, t in visual.items()}
        self.calls.append(next(iter(visual.values())).shape[0])
        start = time.perf_counter()
        result = self.scorer.score_batch(visual)  # the pipeline keeps the first rows only
        self.seconds += time.perf_counter() - start
        return result


def bench_small(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from iqa_cli.scoring.config import AUTO_BATCH
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
    from iqa_cli.scoring.readout import Readout
    from iqa_cli.scoring.scorer import Scorer

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
        model=ModelSpec(dtype=args.dtype),
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
    cpu.add_argument("--counts", default="160,1000", help="images per run, one table each")
    cpu.add_argument("--workers", type=int, default=2)
    cpu.add_argument("--batch-size", type=int, default=16)
    cpu.add_argument("--image-size", type=int, default=448, help="input side of the tiny model (28 or 448)")
    cpu.add_argument("--repeats", type=int, default=2)
    cpu.add_argument("--fast-decode", action="store_true", help="also time iqa score --fast-decode")
    stages = sub.add_parser("stages")
    stages.add_argument("--images", type=int, default=64)
    stages.add_argument("--image-size", type=int, default=448, help="input side of the tiny model (28 or 448)")
    stages.add_argument("--repeats", type=int, default=3)
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
    elif args.mode == "stages":
        bench_stages(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
