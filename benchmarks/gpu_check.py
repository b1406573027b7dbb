"""Every GPU-only path of iqa in one prepared call: a lent GPU runs it once (under 9 minutes on an H100) and it
prints one table. Nothing is downloaded: the tiny random checkpoints of the tests, and 7B models with random
weights built on the GPU (mPLUG-Owl2-7B and Qwen2.5-VL-7B shapes, 448 px inputs).

Rows, in order (a section that fails prints FAILED with its reason and the others still run; a section that
would start after `--budget` seconds prints "skipped: time budget"):

- gpu tests: `pytest -m gpu` over the test files that have such tests (passed/failed/skipped);
- float32 vs CPU: each tiny family scored in float32 on the GPU and on the CPU, largest probs difference
  (TF32 is off under float32, so it should stay under 1e-4);
- bf16 batch invariance, tiny mPLUG-Owl2 and Qwen2-VL: a probe image's probs in `iqa score`'s pipeline in a full
  batch, in the padded last batch and alone (a 1-row run), and in `iqa serve`'s model calls alone (padded to
  --max-batch), among others, and in a smaller call size; each against the full batch;
- 7B scoring, for each shape in bf16, int8 and int4: the probe among 15 others vs alone in a 16-row call (bf16),
  `iqa score`'s pipeline (JPEG files -> workers -> model -> Parquet) images/s and peak GPU memory at batch 16
  and 64; for mPLUG-Owl2 bf16 also `iqa serve`'s one-image latency and warm-up with --max-batch 64 alone and
  with call sizes 8/16/32/64, and `--batch-size auto` under a memory fraction that fits 32 rows and not 64
  (the halving, the memory allocated before and after, and the scores against `--batch-size 32`);
- training, tiny mPLUG-Owl2: steps/s, peak memory and final loss of LoRA, full tuning and full tuning under a
  one-rank FSDP2 group (whose loss should equal the single-GPU one: same float32 parameters, same autocast);
- serve: `iqa serve` on the tiny checkpoint in a subprocess, start to a healthy /health, and one image's
  latency over HTTP.

`--dry-run` runs every section with tiny models on the CPU (int4 and the memory fraction need CUDA and say so):
a check of this script, about a minute on 2 cores (tests/test_gpu_check.py runs it).

    .venv/bin/python benchmarks/gpu_check.py                 # on the GPU machine: one call, one table
    .venv/bin/python benchmarks/gpu_check.py --dry-run       # the same code paths on the CPU, tiny models
    .venv/bin/python benchmarks/gpu_check.py --skip gpu-tests,serve --budget 300
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.factories, when run as a script
sys.path.insert(0, str(REPO / "benchmarks"))  # bench_score, bench_train

from iqa_cli.process import quiet_torchao_notice  # noqa: E402

quiet_torchao_notice()  # transformers imports torchao when installed: two notice lines per run

SECTIONS = ("gpu-tests", "float32", "invariance", "7b", "training", "serve")
# Qwen2.5-VL-7B-Instruct's config (text and vision sizes); token ids come from the tiny checkpoint's tokenizer.
QWEN25_7B_TEXT = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
}  # fmt: skip
QWEN25_7B_VISION = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu",
}  # fmt: skip


@dataclass
class Check:
    """The run's settings and its table, printed row by row (a run cut short still shows what it measured)."""

    device: torch.device
    dry: bool
    tmp: Path
    budget: float
    started: float = field(default_factory=time.monotonic)
    failed: int = 0

    def row(self, section: str, check: str, result: str) -> None:
        print(f"| {section} | {check} | {' '.join(result.split())} |", flush=True)

    def attempt(self, section: str, check: str, fn: Callable[[], None]) -> None:
        """Runs one measurement; its failure is one FAILED row (the rest of the table still comes)."""
        if time.monotonic() - self.started > self.budget:
            self.row(section, check, f"skipped: time budget ({self.budget:.0f} s) spent")
            return
        try:
            fn()
        except Exception as exc:  # one row per failure, the traceback on stderr
            self.failed += 1
            traceback.print_exc(file=sys.stderr)
            self.row(section, check, f"FAILED: {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            free(self.device)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (CPU)"


def noise_images(n: int, seed: int, size: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    w, h = size
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def tiny_checkpoints(tmp: Path) -> dict[str, Path]:
    """Every tiny family's checkpoint directory (written once per run)."""
    from iqa_cli.models.hf_vlm.tiny import TINY_FAMILIES, tiny_checkpoint
    from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint

    root = tmp / "tiny"
    if not root.exists():
        write_tiny_checkpoint(root / "mplug_owl2", image_size=28, seed=3)
        for family in TINY_FAMILIES:
            tiny_checkpoint(family, root / family)
    return {p.name: p for p in sorted(root.iterdir())}


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# --- gpu tests -------------------------------------------------------------------------------------------------


def gpu_tests(check: Check) -> None:
    files = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text()
    )
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rf", *files]
    started = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    lines = proc.stdout.strip().splitlines()
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", line)), "")
    check.row(
        "gpu tests",
        f"pytest -m gpu ({len(files)} files)",
        f"{summary.strip('= ')} ({time.monotonic() - started:.0f} s)",
    )
    for line in lines:
        if line.startswith(("FAILED", "ERROR")):
            check.row("gpu tests", "failed", line[:300])
    if proc.returncode not in (0, 5):  # 5: nothing collected
        check.failed += 1


# --- float32 on the GPU vs the CPU -------------------------------------------------------------------------------


def float32_vs_cpu(check: Check) -> None:
    from iqa_cli.scoring.scorer import Scorer

    images = noise_images(4, seed=1) + noise_images(2, seed=2, size=(40, 56))
    for family, path in tiny_checkpoints(check.tmp).items():

        def compare(family=family, path=path) -> None:
            cpu = Scorer.from_pretrained(path, device="cpu", dtype="float32")
            on = Scorer.from_pretrained(path, device=check.device, dtype="float32") if check.cuda else cpu
            a = [r.probs for r in cpu.score(images, batch_size=3)]
            b = [r.probs for r in on.score(images, batch_size=3)]
            diff = max_diff(a, b)
            verdict = "ok" if diff < 1e-4 else "ABOVE 1e-4"
            flags = f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}"
            check.row("float32 vs CPU", family, f"max probs difference {diff:.1e} ({verdict}; {flags})")

        check.attempt("float32 vs CPU", family, compare)


# --- bf16 batch invariance (tiny models) -------------------------------------------------------------------------


def probe_probs(check: Check, scorer, folder: Path, name: str, batch: int) -> np.ndarray:
    """The probe's probs from `iqa score`'s pipeline over `folder` at `batch` rows."""
    import pyarrow.parquet as pq

    from iqa_cli.model_options import ModelSpec
    from iqa_cli.scoring.config import ScoreConfig
    from iqa_cli.scoring.driver import score_images

    out = check.tmp / f"{folder.name}.parquet"
    config = ScoreConfig(
        out=out, inputs=[str(folder)], batch_size=batch, workers=0 if check.dry else 2, device=str(check.device),
        model=ModelSpec(dtype="bfloat16"), quiet=True, overwrite=True,
    )  # fmt: skip
    score_images(config, scorer_factory=lambda device: scorer)
    table = pq.read_table(out).to_pandas()
    return np.array(table.loc[table["image"] == name, "probs"].iloc[0], dtype=np.float64)


def _folder(root: Path, images: list[tuple[str, Image.Image]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, image in images:
        image.save(root / name)
    return root


def model_rows(scorer, visuals: list, rows: int) -> np.ndarray:
    """probs of `scorer.score_batch` over `visuals` padded to `rows` rows."""
    batch = scorer.score_batch(scorer.collate(visuals, rows, torch.float32))
    return batch.probs.float().numpy()


def batch_invariance(check: Check) -> None:
    from iqa_cli.scoring.scorer import Scorer
    from iqa_cli.serving.batcher import Batcher

    checkpoints = tiny_checkpoints(check.tmp)
    probe, *others = noise_images(8, seed=5)
    batch = 4
    for family in ("mplug_owl2", "qwen2_vl"):

        def pipeline(family=family) -> None:
            scorer = Scorer.from_pretrained(checkpoints[family], device=check.device, dtype="bfloat16")
            named = [(f"img{i}.png", image) for i, image in enumerate(others)]
            base = check.tmp / f"invariance-{family}"
            full = _folder(base / "full", [("a_probe.png", probe), *named[: 2 * batch - 1]])
            padded = _folder(base / "padded", [*named[:batch], ("z_probe.png", probe)])
            alone = _folder(base / "alone", [("a_probe.png", probe)])
            a = probe_probs(check, scorer, full, "a_probe.png", batch)
            b = probe_probs(check, scorer, padded, "z_probe.png", batch)
            c = probe_probs(check, scorer, alone, "a_probe.png", batch)
            check.row(
                "bf16 invariance",
                f"{family}, iqa score",
                f"probe in a full batch of {batch} vs in the padded last batch: {max_diff(a, b):.1e}; "
                f"vs alone (a 1-row run): {max_diff(a, c):.1e}",
            )

        def serve(family=family) -> None:
            from iqa_cli.serving.batcher import _Item

            scorer = Scorer.from_pretrained(checkpoints[family], device=check.device, dtype="bfloat16")
            batcher = Batcher(scorer, max_batch=batch, max_wait_s=0, queue_limit=64, call_sizes=[1])
            visuals = [scorer.transform(image) for image in (probe, *others[: batch - 1])]

            def probs(items: list, size: int) -> list[float]:
                return batcher._score([_Item(v, Future()) for v in items], size)[0].probs

            among = probs(visuals, batch)
            alone = probs(visuals[:1], batch)
            small = probs(visuals[:1], 1)
            check.row(
                "bf16 invariance",
                f"{family}, iqa serve",
                f"probe among {batch - 1} others vs alone in a {batch}-row call: {max_diff(among, alone):.1e}; "
                f"vs a 1-row call (call sizes): {max_diff(among, small):.1e}",
            )

        check.attempt("bf16 invariance", f"{family}, iqa score", pipeline)
        check.attempt("bf16 invariance", f"{family}, iqa serve", serve)


# --- 7B scoring --------------------------------------------------------------------------------------------------


def mplug_scorer(check: Check, dtype: torch.dtype):
    from bench_score import random_scorer

    return random_scorer(check.dry, check.device, dtype)[0]


def qwen_scorer(check: Check, dtype: torch.dtype):
    """Qwen2.5-VL with random weights built on the device: the 7B's sizes (the tiny config's with --dry-run), the
    tiny checkpoint's processor (its image processor has the real patch, merge and temporal sizes)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from iqa_cli.models.backbone import Provenance
    from iqa_cli.models.hf_vlm.backbone import HFVisionLanguageBackbone
    from iqa_cli.models.hf_vlm.preprocess import pixel_options
    from iqa_cli.scoring.readout import build_readout
    from iqa_cli.scoring.scorer import Scorer

    tiny = tiny_checkpoints(check.tmp)["qwen2_5_vl"]
    config = AutoConfig.from_pretrained(tiny)
    if not check.dry:
        config = qwen25_7b_config(config)
    with torch.device(check.device):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype).eval().requires_grad_(False)
    processor = AutoProcessor.from_pretrained(tiny)
    options = pixel_options("qwen2_5_vl", None, None, 28)  # 448 x 448 pixels: 256 visual tokens
    name = "random qwen2.5-vl" + ("-tiny" if check.dry else "-7b")
    backbone = HFVisionLanguageBackbone(
        model, processor, provenance=Provenance(model=name), images_kwargs=options, source=name
    )
    return Scorer(backbone, build_readout(backbone, None, None), {"model": name, "dtype": str(dtype)})


def qwen25_7b_config(tiny):
    """Qwen2.5-VL-7B's sizes with the tiny checkpoint's token ids (its tokenizer and processor are used).
    tests/test_gpu_check.py builds it on the meta device: the one part of the 7B path `--dry-run` leaves out."""
    from transformers import AutoConfig

    ids = {k: getattr(tiny, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id")}
    ids["vision_end_token_id"] = tiny.vision_end_token_id
    text = {**QWEN25_7B_TEXT, "pad_token_id": tiny.text_config.pad_token_id}
    return AutoConfig.for_model(
        "qwen2_5_vl", text_config=text, vision_config=QWEN25_7B_VISION, tie_word_embeddings=False, **ids
    )


def quantized(check: Check, build, mode: str | None):
    scorer = build(check, torch.bfloat16)
    if mode is not None:
        from iqa_cli.scoring import quantize

        quantize.check(mode, check.device, torch.bfloat16)
        quantize.quantize_model(scorer.model, mode, check.device)
    return scorer


def pipeline_rate(check: Check, scorer, folder: Path, batch: int | str) -> tuple[float, str, Path]:
    """images/s of `iqa score`'s loop over `folder` at `batch` rows, its peak memory, and the output."""
    from iqa_cli.model_options import ModelSpec
    from iqa_cli.scoring.config import ScoreConfig
    from iqa_cli.scoring.driver import score_images

    out = check.tmp / f"scores-{batch}.parquet"
    workers = 0 if check.dry else min(16, os.cpu_count() or 1)
    config = ScoreConfig(
        out=out, inputs=[str(folder)], batch_size=batch, workers=workers, device=str(check.device),
        model=ModelSpec(dtype="bfloat16"), quiet=True, overwrite=True,
    )  # fmt: skip
    reset_peak(check.device)
    summary = score_images(config, scorer_factory=lambda device: scorer)
    return summary.images_per_second, peak(check.device), out


def serve_latency(check: Check, scorer, label: str) -> None:
    """`iqa serve`'s batcher in this process: warm-up time and one image's latency (median of 5)."""
    from iqa_cli.serving.batcher import Batcher

    top = 4 if check.dry else 64
    probe = scorer.transform(noise_images(1, seed=9, size=(640, 480))[0])
    for sizes in (None, [1, 2] if check.dry else [8, 16, 32]):
        batcher = Batcher(scorer, max_batch=top, max_wait_s=0, queue_limit=4 * top, call_sizes=sizes)
        started = time.perf_counter()
        batcher.warm_up(probe)
        warm = time.perf_counter() - started
        batcher.start()
        try:
            times = []
            for _ in range(5):
                started = time.perf_counter()
                asyncio.run(batcher.score([probe]))
                times.append(time.perf_counter() - started)
        finally:
            batcher.stop()
        shape = f"--max-batch {top}" + (f", call sizes {','.join(map(str, sizes))},{top}" if sizes else " only")
        check.row(
            "7B scoring",
            f"{label}, iqa serve one image",
            f"{shape}: {statistics.median(times) * 1e3:.0f} ms (median of 5); warm-up {warm:.1f} s",
        )


def auto_batch(check: Check, scorer, folder: Path) -> None:
    """--batch-size auto under a memory fraction that fits 32 rows and not 64: it halves once, frees what the
    failed call held, and scores as --batch-size 32 does."""
    import pyarrow.parquet as pq
    from rich.console import Console

    from iqa_cli.model_options import ModelSpec
    from iqa_cli.scoring.config import ScoreConfig
    from iqa_cli.scoring.driver import score_images

    visual = scorer.transform(noise_images(1, seed=9, size=(640, 480))[0])
    fraction = None
    if check.cuda:
        peaks = {}
        for rows in (32, 64):
            reset_peak(check.device)
            scorer.score_batch(scorer.collate([visual] * rows, rows, torch.float32))
            peaks[rows] = torch.cuda.max_memory_allocated(check.device)
        total = torch.cuda.get_device_properties(check.device).total_memory
        fraction = (peaks[32] + (peaks[64] - peaks[32]) / 2) / total
        torch.cuda.set_per_process_memory_fraction(fraction, check.device)
    try:
        free(check.device)
        before = torch.cuda.memory_allocated(check.device) if check.cuda else 0
        messages = io.StringIO()
        workers = 0 if check.dry else min(16, os.cpu_count() or 1)
        auto_out = check.tmp / "auto.parquet"
        config = ScoreConfig(
            out=auto_out, inputs=[str(folder)], batch_size="auto", workers=workers, device=str(check.device),
            model=ModelSpec(dtype="bfloat16"), overwrite=True,
        )  # fmt: skip
        score_images(config, scorer_factory=lambda device: scorer, console=Console(file=messages, width=300))
        free(check.device)
        after = torch.cuda.memory_allocated(check.device) if check.cuda else 0
    finally:
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, check.device)
    said = next((line for line in messages.getvalue().splitlines() if "--batch-size auto" in line), "")
    fixed_rows = 32 if check.cuda else 16  # the CPU's auto is 16 rows and never halves
    _, _, fixed_out = pipeline_rate(check, scorer, folder, fixed_rows)
    diff = max_diff(pq.read_table(auto_out).column("score"), pq.read_table(fixed_out).column("score"))
    where = f"fraction {fraction:.2f}" if fraction is not None else "CPU (no memory fraction: nothing to halve)"
    check.row(
        "7B scoring",
        "mplug-owl2 bf16, --batch-size auto",
        f"{where}: {said or 'no halving'}; allocated before {before / 2**30:.1f} GiB, after {after / 2**30:.1f} "
        f"GiB; scores vs --batch-size {fixed_rows}: max difference {diff:.1e}",
    )


def seven_b(check: Check) -> None:
    from bench_score import make_jpegs

    count, size = (12, (96, 72)) if check.dry else (256, (1024, 768))
    folder = check.tmp / "jpegs"
    if not folder.exists():
        make_jpegs(folder, count, size)
    for label, build in (("mplug-owl2", mplug_scorer), ("qwen2.5-vl", qwen_scorer)):
        for mode in (None, "int8", "int4"):
            if mode == "int4" and not check.cuda:
                check.row("7B scoring", f"{label} int4", "skipped: int4 needs CUDA (dry run)")
                continue
            one_model(check, label, build, mode, folder)
            free(check.device)  # the model is gone with `one_model`'s frame


def one_model(check: Check, label: str, build, mode: str | None, folder: Path) -> None:
    """One 7B model (bf16, or quantized): build, batch invariance, `iqa score` at each batch size, and for
    mPLUG-Owl2 in bf16 the serve latency and `--batch-size auto`."""
    name = f"{label} {mode or 'bf16'}"
    holder: dict = {}

    def load() -> None:
        started = time.perf_counter()
        holder["scorer"] = quantized(check, build, mode)
        params = sum(p.numel() for p in holder["scorer"].model.parameters())
        check.row(
            "7B scoring", f"{name} build", f"{params / 1e6:,.2f} M parameters, {time.perf_counter() - started:.1f} s"
        )

    check.attempt("7B scoring", f"{name} build", load)
    scorer = holder.pop("scorer", None)
    if scorer is None:
        return
    if mode is None:

        def invariance() -> None:
            probe, *others = noise_images(16, seed=7, size=(640, 480))
            visuals = [scorer.transform(image) for image in (probe, *others)]
            among, alone = model_rows(scorer, visuals, 16)[0], model_rows(scorer, visuals[:1], 16)[0]
            check.row("7B scoring", f"{name} batch invariance", f"probe among 15 others vs alone in a 16-row call: "
                      f"max probs difference {max_diff(among, alone):.1e}")  # fmt: skip

        check.attempt("7B scoring", f"{name} batch invariance", invariance)
    for batch in (2, 4) if check.dry else (16, 64):

        def rate(batch=batch) -> None:
            speed, memory, _ = pipeline_rate(check, scorer, folder, batch)
            check.row("7B scoring", f"{name}, iqa score batch {batch}", f"{speed:.1f} images/s, {memory}")

        check.attempt("7B scoring", f"{name}, iqa score batch {batch}", rate)
    if mode is None and label == "mplug-owl2":
        check.attempt("7B scoring", f"{name}, iqa serve", lambda: serve_latency(check, scorer, name))
        check.attempt("7B scoring", f"{name}, --batch-size auto", lambda: auto_batch(check, scorer, folder))


# --- training ------------------------------------------------------------------------------------------------


def training(check: Check) -> None:
    import bench_train

    from iqa_cli.models.mplug_owl2.config import MPLUGOwl2Config
    from iqa_cli.training import TrainConfig

    data = check.tmp / "train-data"
    if not data.exists():
        bench_train.prepare(bench_train.synthetic_images(check.tmp / "train-src" / "images", 48, (72, 56)), data)
    tok = bench_train.tokenizer_dir(check.tmp, real=False)
    base = MPLUGOwl2Config.from_name("mplug-owl2-tiny").replace(vision={"image_size": 56}, abstractor={"grid_size": 4})
    steps, batch = (3, 4) if check.dry else (14, 8)
    losses = {}
    for mode, lora, strategy in (
        ("LoRA", True, "auto"),
        ("full", False, "auto"),
        ("full, FSDP2 one rank", False, "fsdp"),
    ):

        def train(mode=mode, lora=lora, strategy=strategy) -> None:
            loaded = bench_train.in_memory_checkpoint(base, check.device, tok, check.tmp / f"model-{len(losses)}")
            config = TrainConfig.from_options(
                out=check.tmp / f"run-{len(losses)}", model="random tiny", datasets=["bench"], data_dir=data,
                method="deqa", batch_size=batch, epochs=8, max_steps=steps, device=str(check.device),
                workers=0 if check.dry else 4, evaluate=False, quiet=True, mlp_dims=[64, 64], lora=lora, lora_r=8,
                lora_alpha=16, strategy=strategy,
            )  # fmt: skip
            result = bench_train.run(config, loaded=loaded, warmup=1)
            losses[mode] = result["final_loss"]
            memory = (
                f"peak {result['peak_gib']:.2f} GiB allocated" if check.cuda else f"RSS {result['peak_gib']:.2f} GiB"
            )
            check.row(
                "training",
                f"tiny mPLUG-Owl2 deqa {mode}",
                f"{result['samples_per_s'] / batch:.2f} steps/s (batch {batch}, {result['steps_timed']} steps), "
                f"{memory}, final loss {result['final_loss']:.6f}",
            )

        check.attempt("training", f"tiny mPLUG-Owl2 {mode}", train)
    if "full" in losses and "full, FSDP2 one rank" in losses:
        diff = abs(losses["full"] - losses["full, FSDP2 one rank"])
        check.row("training", "full: one GPU vs FSDP2", f"final loss difference {diff:.1e}")


# --- serve -----------------------------------------------------------------------------------------------------


def serve(check: Check) -> None:
    checkpoint = tiny_checkpoints(check.tmp)["mplug_owl2"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    device = f"cuda:{check.device.index or 0}" if check.cuda else "cpu"
    command = [sys.executable, "-m", "iqa_cli", "serve", "--model", str(checkpoint), "--devices", device,
               "--port", str(port), "--max-batch", "8"]  # fmt: skip
    log = (check.tmp / "serve.log").open("w")
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"iqa serve exited {proc.returncode}: {(check.tmp / 'serve.log').read_text()[-300:]}"
                )
            if time.monotonic() - started > 180:
                raise RuntimeError("iqa serve did not answer /health within 180 s")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        startup = time.monotonic() - started
        buffer = io.BytesIO()
        noise_images(1, seed=11, size=(640, 480))[0].save(buffer, format="JPEG", quality=90)
        body = json.dumps({"images": [base64.b64encode(buffer.getvalue()).decode()]}).encode()
        times = []
        for _ in range(6):
            request = urllib.request.Request(f"{url}/score", data=body, headers={"Content-Type": "application/json"})
            began = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as answer:
                json.loads(answer.read())
            times.append(time.perf_counter() - began)
        latency = statistics.median(times[1:]) * 1e3
        check.row(
            "serve",
            f"tiny mPLUG-Owl2 on {device}, --max-batch 8",
            f"start to healthy /health {startup:.1f} s; one image over HTTP {latency:.1f} ms (median of 5 after the "
            "first)",
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks this script runs")
    parser.add_argument("--device", default="cuda", help="the GPU to check [default: cuda]")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds after which no new check starts")
    parser.add_argument("--skip", default="", help=f"sections to leave out, of {','.join(SECTIONS)}")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --dry-run to check the script on the CPU")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(SECTIONS):
        raise SystemExit(f"--skip: unknown sections {sorted(skip - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, dry run)"
    print(f"iqa gpu check: {where}, torch {torch.__version__}, {os.cpu_count()} CPU cores")
    print("\n| section | check | result |\n|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="iqa-gpu-check-") as tmp:
        check = Check(device=device, dry=args.dry_run, tmp=Path(tmp), budget=args.budget)
        steps = {
            "gpu-tests": ("gpu tests", gpu_tests),
            "float32": ("float32 vs CPU", float32_vs_cpu),
            "invariance": ("bf16 invariance", batch_invariance),
            "7b": ("7B scoring", seven_b),
            "training": ("training", training),
            "serve": ("serve", serve),
        }
        for key, (section, run) in steps.items():
            if key not in skip:
                check.attempt(section, "-", lambda run=run: run(check))
        seconds = time.monotonic() - check.started
    print(f"\n{seconds:.0f} s; {check.failed} failed", flush=True)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
