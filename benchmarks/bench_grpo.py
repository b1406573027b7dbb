"""CPU figures of reasoning models with the tiny random Qwen2-VL: GRPO steps/s, generation tokens/s, and images/s of
reasoning scoring with and without thinking against the one-forward level readout.

- GRPO: `iqa train --method grpo` (in process, float32) on synthetic images for `--steps` steps of `--batch` images
  x `--generations` answers of up to `--completion` tokens; steps/s over the training loop (model loading and
  the final save excluded), and the answers' tokens per second of that loop.
- generation: `generate_greedy` (the scoring path: left-padded batch, KV cache) of `--gen-batch` rows for
  `--gen-tokens` new tokens (a random model rarely ends early: the count is what was generated).
- scoring: `Scorer.score_batch` on `--score-batch` images: the level readout (one forward, LM head at the last
  position), `--reasoning visualquality-r1-nothink` with a budget of `--answer-tokens` (an answer-only reply is a
  few tokens), `--reasoning visualquality-r1` with `--think-tokens` (the recipes' completion length is 256).
  Random weights answer nonsense of exactly the budget, so the figures are the cost of that many tokens.

    python benchmarks/bench_grpo.py                      # the BENCHMARKS.md figures
    python benchmarks/bench_grpo.py --steps 2 --think-tokens 16 --repeat 1 --json   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timing import best_seconds

from iqa_cli.models.hf_vlm.tiny import tiny_checkpoint
from iqa_cli.process import quiet_torchao_notice

quiet_torchao_notice()

PIXELS = {"min_pixels": 224 * 224, "max_pixels": 224 * 224}  # 64 visual tokens per image (the default: 256)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(n)]


def bench_grpo(root: Path, model: Path, args) -> dict:
    import pandas as pd

    from iqa_cli.prepare import write_meta
    from iqa_cli.training import TrainConfig, train

    images = root / "images"
    images.mkdir()
    n = args.batch * 2 + 2
    for i, image in enumerate(_images(n, seed=1)):
        image.save(images / f"{i}.png")
    mos = np.linspace(1, 5, n)
    frame = pd.DataFrame({
        "image": [f"{i}.png" for i in range(n)], "dataset": "bench", "split": ["train"] * (n - 2) + ["test"] * 2,
        "mos": mos, "std": 0.5, "mos_norm": mos, "std_norm": 0.5, "level": np.clip(np.round(mos) - 1, 0, 4).astype(int),
    })  # fmt: skip
    metadata = {"level_names": json.dumps(["bad", "poor", "fair", "good", "excellent"]), "levels": "5",
                "image_root": str(images), "dataset": "bench"}  # fmt: skip
    write_meta(frame, np.full((n, 5), 0.2), metadata, root / "data" / "bench.parquet")
    config = TrainConfig.from_options(
        datasets=["bench"], data_dir=root / "data", model=str(model), out=root / "run", method="grpo",
        max_steps=args.steps, batch_size=args.batch, num_generations=args.generations,
        max_completion_length=args.completion, gradient_checkpointing=False, workers=0, quiet=True, evaluate=False,
        save_minutes=0, **PIXELS,
    )  # fmt: skip
    result = train(config)
    log = [json.loads(line) for line in (root / "run" / "train_log.jsonl").read_text().splitlines()]
    answers = args.batch * args.generations
    tokens = sum(line["completions/mean_length"] * answers for line in log if "reward" in line)
    return {
        "steps": result.steps_this_run,
        "seconds": round(result.seconds, 2),
        "steps_per_s": round(result.steps_this_run / result.seconds, 3),
        "answer_tokens_per_s": round(tokens / result.seconds, 1),
    }


def bench_generation(scorer, args) -> dict:
    backbone = scorer.backbone
    images = _images(args.gen_batch, seed=2)
    visual = backbone.collate([backbone.transform(im) for im in images], len(images), torch.float32)
    ids = torch.tensor([scorer.readout.input_ids] * len(images))
    counts = []

    def run():
        out = backbone.generate_greedy(visual, ids, max_new_tokens=args.gen_tokens)
        counts.append(sum(len(row) for row in out.ids))

    with torch.inference_mode():
        seconds = best_seconds(run, args.repeat)
    return {"rows": len(images), "new_tokens": counts[-1], "tokens_per_s": round(counts[-1] / seconds, 1)}


def bench_scoring(model: Path, args) -> list[dict]:
    from iqa_cli.scoring.scorer import Scorer

    images = _images(args.score_batch, seed=3)
    rows = []
    for label, options in (
        ("levels (one forward)", {}),
        (f"reasoning, no thinking ({args.answer_tokens} tokens)",
         {"reasoning": "visualquality-r1-nothink", "max_new_tokens": args.answer_tokens}),
        (f"reasoning, thinking ({args.think_tokens} tokens)",
         {"reasoning": "visualquality-r1", "max_new_tokens": args.think_tokens}),
    ):  # fmt: skip
        scorer = Scorer.from_pretrained(model, device="cpu", dtype="float32", **options, **PIXELS)
        visual = scorer.collate([scorer.transform(im) for im in images], len(images), torch.float32)
        scorer.score_batch(visual)  # warm-up
        seconds = best_seconds(lambda s=scorer, v=visual: s.score_batch(v), args.repeat)
        rows.append({"readout": label, "images_per_s": round(len(images) / seconds, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="images per GRPO step")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion", type=int, default=64, help="max tokens per sampled answer")
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--score-batch", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--think-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = tiny_checkpoint("qwen2_vl", root / "model")
        from iqa_cli.scoring.scorer import Scorer

        scorer = Scorer.from_pretrained(
            model, device="cpu", dtype="float32", reasoning="visualquality-r1", max_new_tokens=args.gen_tokens,
            **PIXELS,
        )  # fmt: skip
        report = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads",
            "generation": bench_generation(scorer, args),
            "scoring": bench_scoring(model, args),
            "grpo": bench_grpo(root, model, args),
        }
    if args.json:
        print(json.dumps(report))
        return
    print(report["machine"])
    g = report["grpo"]
    print(
        f"GRPO: {g['steps']} steps of {args.batch} images x {args.generations} answers (<= {args.completion} tokens) "
        f"in {g['seconds']} s: {g['steps_per_s']} steps/s, {g['answer_tokens_per_s']} answer tokens/s"
    )
    gen = report["generation"]
    print(f"greedy generation, {gen['rows']} rows: {gen['new_tokens']} tokens, {gen['tokens_per_s']} tokens/s")
    base = report["scoring"][0]["images_per_s"]
    for row in report["scoring"]:
        print(f"scoring {row['readout']}: {row['images_per_s']} images/s ({row['images_per_s'] / base:.3f}x levels)")


if __name__ == "__main__":
    main()
