"""CPU images/s of the tiny random checkpoint of each model family, scored through the same `Scorer`.

For every family (the transformers ones of `iqa_cli.models.hf_vlm.tiny` and the tiny mPLUG-Owl2 of the tests)
the script writes the checkpoint, loads it with `Scorer.from_pretrained` (float32, CPU) and times, on the same
RGB images, the two halves of `iqa score`'s work separately: preprocessing (the family's `transform` per image
plus its `collate`, which DataLoader workers do) and the model call (`Scorer.score_batch`: one forward pass, LM
head at the last position only). Weights are random; the tiny configs differ in width, so what the figures
compare is mostly the sequence each family builds (visual tokens per image at its default resolution) and
the per-call overhead of each path. Prints a table and, with --json, one JSON object.

    python benchmarks/bench_families.py                     # 640x480 images, batch sizes 1 and 8
    python benchmarks/bench_families.py --batch-sizes 1,8,32 --size 1024x768 --repeat 5
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

from iqa_cli.models.hf_vlm.tiny import TINY_FAMILIES, tiny_checkpoint
from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint
from iqa_cli.process import quiet_torchao_notice
from iqa_cli.scoring.scorer import Scorer

quiet_torchao_notice()  # transformers imports torchao when installed: two notice lines per run


def measure(scorer: Scorer, images: list[Image.Image], batch: int, repeat: int) -> dict:
    chunk = images[:batch]
    prep = best_seconds(lambda: scorer.collate([scorer.transform(im) for im in chunk], batch, torch.float32), repeat)
    visual = scorer.collate([scorer.transform(im) for im in chunk], batch, torch.float32)
    scorer.score_batch(visual)  # warm-up
    model = best_seconds(lambda: scorer.score_batch(visual), repeat)
    if "image_ids" in visual:  # hf_vlm: the ids each image token expands to
        tokens = visual["image_ids"].ge(0).sum(1).float().mean().item()
    else:  # mPLUG-Owl2: a fixed count per image
        tokens = float(getattr(scorer.model, "num_visual_tokens", float("nan")))
    return {"batch": batch, "visual_tokens": round(tokens, 1), "preprocess_images_per_s": batch / prep,
            "model_images_per_s": batch / model, "prompt_ids": len(scorer.readout.input_ids)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--size", default="640x480", help="WxH of the random test images")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats (best is reported)")
    parser.add_argument("--families", default=",".join(("mplug_owl2", *TINY_FAMILIES)))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    w, h = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(max(batches))]
    torch.manual_seed(0)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            directory = Path(tmp) / family
            if family == "mplug_owl2":
                write_tiny_checkpoint(directory, image_size=28)
            else:
                tiny_checkpoint(family, directory)
            scorer = Scorer.from_pretrained(directory, device="cpu", dtype="float32")
            with torch.inference_mode():
                results[family] = [measure(scorer, images, b, args.repeat) for b in batches]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if args.json:
        print(json.dumps({"machine": machine, "load": load, "size": args.size, "results": results}))
        return
    print(f"{machine}; load average {load:.1f}; images {args.size}; best of {args.repeat}")
    print(f"{'family':<16} {'batch':>5} {'visual tok':>10} {'prompt ids':>10} {'prep img/s':>11} {'model img/s':>12}"
          f" {'model vs mplug':>15}")  # fmt: skip
    reference = {r["batch"]: r["model_images_per_s"] for r in results.get("mplug_owl2", [])}
    for family, rows in results.items():
        for r in rows:
            ratio = r["model_images_per_s"] / reference[r["batch"]] if r["batch"] in reference else float("nan")
            speeds = f"{r['preprocess_images_per_s']:>11.1f} {r['model_images_per_s']:>12.1f} {ratio:>14.2f}x"
            print(f"{family:<16} {r['batch']:>5} {r['visual_tokens']:>10} {r['prompt_ids']:>10} {speeds}")


if __name__ == "__main__":
    main()
