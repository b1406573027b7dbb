"""Training throughput (samples/s, images/s) and peak memory of `iqa train`'s loop on synthetic data.

Default (CPU): a tiny mPLUG-Owl2 from random weights, written as a checkpoint directory and trained through
`iqa_cli.training` exactly as `iqa train --model DIR` does.

`--gpu`: the full-size model (ViT-L/14 at 448 px, 6-layer abstractor, LLaMA-2-7B) with random weights built
in memory on the device, on KonIQ-size JPEGs (1024x768) decoded by DataLoader workers, in two modes:
- lora: LoRA r 128 / alpha 256 on q_proj + v_proj.multiway.1, vision model and abstractor trained, frozen
  weights in bf16, bf16 autocast, gradient checkpointing (the reference's LoRA recipe);
- full: every weight trained, FSDP2 over a one-rank group with bf16 compute and float32 master weights.
  The 7B model with AdamW needs ~130 GB (fp32 weights + grads + two moments), more than one GPU holds, so this
  mode trains the first `--full-layers` LLM layers (default 8) and reports the per-layer cost too.
`--gpu --tiny --device cpu` runs exactly that code path with the tiny config on the CPU (what CI can check).

The target on one H100: a LoRA epoch over 7,000 KonIQ-size images in under 4 minutes (the time printed for
7,000 samples; a DeQA-Score sample is a pair, i.e. 14,000 images through the model).

    .venv/bin/python benchmarks/bench_train.py [--method deqa] [--steps 20] [--batch-size 8]
    .venv/bin/python benchmarks/bench_train.py --gpu [--modes lora,full] [--batch-size 64]
    .venv/bin/python benchmarks/bench_train.py --gpu --tiny --device cpu --steps 4
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from iqa_cli import distributed  # noqa: E402
from iqa_cli.models.mplug_owl2.backbone import MPLUGOwl2Backbone  # noqa: E402
from iqa_cli.models.mplug_owl2.config import MPLUGOwl2Config  # noqa: E402
from iqa_cli.process import quiet_torchao_notice  # noqa: E402
from iqa_cli.training import METHODS, TrainConfig  # noqa: E402
from iqa_cli.training import loop as train_loop  # noqa: E402
from iqa_cli.training import session as train_session  # noqa: E402
from iqa_cli.training import state as train_state  # noqa: E402

quiet_torchao_notice()  # transformers imports torchao when installed: two notice lines per run

REAL_TOKENIZER = REPO / "tests" / "fixtures" / "mplug-owl2-tokenizer"


def synthetic_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """JPEGs of smooth random content with graded noise, and a scores CSV (image, mos, std)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    rows = []
    for i in range(n):
        low = rng.uniform(0, 255, (max(2, h // 64), max(2, w // 64), 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        strength = rng.uniform()
        image = (image + rng.normal(0, 40 * strength, image.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=90)
        rows.append((f"{i:05d}.jpg", 100 * (1 - strength) + 5, 5 + 5 * rng.uniform()))
    scores = folder.parent / "scores.csv"
    with scores.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mos", "std"])
        writer.writerows(rows)
    return scores


def prepare(scores: Path, data_dir: Path) -> None:
    from iqa_cli.datasets import ReadOptions
    from iqa_cli.prepare import PrepareConfig, prepare_dataset

    prepare_dataset(
        PrepareConfig(
            dataset="custom",
            source=scores,
            images=scores.parent / "images",
            data_dir=data_dir,
            name="bench",
            test_frac=0.0,
            read_options=ReadOptions("image", "mos", "std"),
        )
    )


def tokenizer_dir(tmp: Path, real: bool) -> Path:
    """The LLaMA-2 tokenizer for the 7B model when the shared fixture is there; else the tests' tiny one."""
    if real and (REAL_TOKENIZER / "tokenizer.model").is_file():
        return REAL_TOKENIZER
    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp / "tokenizer")


def in_memory_checkpoint(config: MPLUGOwl2Config, device: torch.device, tok: Path, tmp: Path):
    """A LoadedCheckpoint of a model with random weights built directly on the device (no files)."""
    from iqa_cli.models.mplug_owl2.checkpoints import LoadedCheckpoint
    from iqa_cli.models.mplug_owl2.model import MPLUGOwl2ForCausalLM
    from iqa_cli.models.mplug_owl2.preprocess import ClipPreprocessor

    side = config.vision.image_size
    preprocessor = ClipPreprocessor(size=side, crop_size=(side, side)).save(tmp)
    torch.manual_seed(0)
    with torch.device(device):
        model = MPLUGOwl2ForCausalLM(config)
    return LoadedCheckpoint(
        model=model,
        config=config,
        layout="full",
        weights_dir=tmp,
        weight_format="safetensors",
        tokenizer_dir=tok,
        preprocessor_config=preprocessor,
    )


def run(config: TrainConfig, loaded=None, warmup: int = 2) -> dict:
    """Trains `config.optim.max_steps` steps without saving; throughput over the steps after `warmup`."""
    device = distributed.resolve_device(config.control.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    save = train_state.save_checkpoint
    train_state.save_checkpoint = lambda *args, **kwargs: None  # timing only: no checkpoint files
    try:
        started = time.perf_counter()
        backbone = MPLUGOwl2Backbone.from_checkpoint(loaded) if loaded is not None else None
        session = train_session.setup(config, "fresh", backbone=backbone)
        setup_s = time.perf_counter() - started
        train_loop.run_training(session)
    finally:
        train_state.save_checkpoint = save
        distributed.destroy()
    log = [json.loads(line) for line in (Path(config.out) / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r][warmup:]
    seconds = sum(config.optim.batch_size / r["samples_per_s"] for r in steps)
    samples = config.optim.batch_size * len(steps)
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    images = samples * (2 if config.paired else 1)
    return {
        "steps_timed": len(steps),
        "samples_per_s": samples / seconds,
        "images_per_s": images / seconds,
        "peak_gib": peak,
        "setup_s": setup_s,
        "final_loss": steps[-1]["loss"] if steps else float("nan"),
    }


def report(name: str, result: dict, device: torch.device) -> None:
    memory = "peak GPU memory allocated" if device.type == "cuda" else "peak RSS of the process so far"
    epoch = 7000 / result["samples_per_s"]
    print(
        f"{name}: {result['samples_per_s']:.2f} samples/s, {result['images_per_s']:.2f} images/s over "
        f"{result['steps_timed']} steps; {memory} {result['peak_gib']:.2f} GiB; setup {result['setup_s']:.1f} s; "
        f"7,000 samples take {epoch / 60:.1f} min"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="full-size model with random weights (LoRA and full)")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: the tiny config (checks the code path)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--method", default="deqa", choices=METHODS)
    parser.add_argument("--modes", default="lora,full", help="--gpu: lora, full or both")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps timed (after 2 warmup steps)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--images", type=int, default=None, help="distinct synthetic images on disk")
    parser.add_argument("--image-size", type=int, default=112, help="CPU mode: the tiny model's input side")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--full-layers", type=int, default=8, help="--gpu full: LLM layers kept (7B has 32)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    device = distributed.resolve_device(args.device)
    full_size = args.gpu and not args.tiny
    batch = args.batch_size or (16 if full_size else 8)
    steps = (args.steps or (10 if full_size else 20)) + 2
    gpu_name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {cpu}, {torch.get_num_threads()} threads, device {device}{gpu_name}")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        per_sample = 2 if args.method == "deqa" else 1
        n_images = args.images or min(2048, max(64, batch * steps * per_sample))
        size = (1024, 768) if full_size else (args.image_size + 16, args.image_size)
        prepare(synthetic_images(tmp / "src" / "images", n_images, size), tmp / "data")
        tok = tokenizer_dir(tmp, real=full_size)
        common = dict(
            datasets=["bench"],
            data_dir=tmp / "data",
            method=args.method,
            batch_size=batch,
            epochs=max(1, -(-steps * batch // n_images) + 1),
            max_steps=steps,
            device=str(device),
            workers=args.workers,
            evaluate=False,
            quiet=True,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            mlp_dims=[2048, 1024] if full_size else [64, 64],
        )

        if not args.gpu:  # tiny checkpoint on disk, loaded the way `iqa train --model DIR` loads it
            from tests.factories import tiny_config, tiny_model, write_checkpoint

            side = args.image_size
            config = tiny_config(vision={"image_size": side}, abstractor={"grid_size": side // 14})
            write_checkpoint(tiny_model(config=config), tmp / "model", tokenizer_dir=tok)
            for lora in (False, True):
                name = f"tiny {args.method} {'lora' if lora else 'full'} ({args.image_size} px, batch {batch})"
                cfg = TrainConfig.from_options(
                    out=tmp / f"run-{lora}", model=str(tmp / "model"), lora=lora, lora_r=8, lora_alpha=16, **common
                )
                report(name, run(cfg), device)
            return

        base = MPLUGOwl2Config.from_name("mplug-owl2-tiny" if args.tiny else "mplug-owl2-7b")
        if args.tiny:
            base = base.replace(vision={"image_size": 56}, abstractor={"grid_size": 4})
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            config = base
            lora = mode == "lora"
            if not lora:
                layers = min(args.full_layers, base.language.num_hidden_layers)
                config = base.replace(num_hidden_layers=layers)
            loaded = in_memory_checkpoint(config, device, tok, tmp / f"model-{mode}")
            cfg = TrainConfig.from_options(
                out=tmp / f"run-{mode}",
                model=f"random {'tiny' if args.tiny else '7b'}",
                lora=lora,
                strategy="auto" if lora else "fsdp",
                **common,
            )
            name = (
                f"{'tiny' if args.tiny else '7B'} {args.method} {mode}"
                + ("" if lora else f" FSDP2 ({config.language.num_hidden_layers} LLM layers)")
                + f", batch {batch}"
            )
            try:
                result = run(cfg, loaded=loaded)
            except torch.OutOfMemoryError as exc:
                print(f"{name}: does not fit ({str(exc).splitlines()[0]})")
                continue
            finally:
                del loaded
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            report(name, result, device)


if __name__ == "__main__":
    main()
