"""`--quantize int8` against float32 on the CPU: score differences, rank agreement, and peak memory of loading.

scores: the tiny random mPLUG-Owl2 checkpoint of the tests (seed 3) scores `--images` generated images in
float32 and with `quantize="int8"`: largest |score difference|, mean difference, SRCC and PLCC of the two.

memory: a wider random checkpoint (LLM `--width` wide, `--layers` layers: most weights in its Linears, as in
the 7B) is loaded in a fresh process per mode; the peak resident memory of the process (VmHWM) after the
imports, after `Scorer.from_pretrained` and after scoring one image, and the bytes of the model's parameters
(torchao's int8 tensors count their int8 data and scales); at the end, resident memory split into anonymous
(the process's own) and file-backed pages. The float32 weights are memory-mapped from the safetensors file
and read when first used; quantizing reads all of them, and the pages read stay mapped while any tensor of the
file lives (clean file pages: the kernel can drop them under pressure, but they count as resident).

int4 needs CUDA and bfloat16 (`iqa_cli/scoring/quantize.py` says why): not measured on the CPU.

    .venv/bin/python benchmarks/bench_quantize.py scores [--images 64]
    .venv/bin/python benchmarks/bench_quantize.py memory [--width 1024 --layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.factories, when run as a script

MEASURE = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch, torchao
from iqa_cli.process import quiet_torchao_notice
from iqa_cli.scoring.scorer import Scorer

quiet_torchao_notice()  # transformers imports torchao when installed: two notice lines per run
from PIL import Image
def status(key="VmHWM"):  # VmHWM: this process's own peak (ru_maxrss survives exec: it would report the parent's)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
before = status()
scorer = Scorer.from_pretrained(sys.argv[1], device="cpu", dtype="float32", quantize=sys.argv[2] or None)
peak, rss = status(), status("VmRSS")
scorer.score([Image.new("RGB", (40, 30), (90, 120, 150))], batch_size=1)
scored, anon, file = status(), status("RssAnon"), status("RssFile")
def nbytes(t):
    inner = [getattr(t, n) for n in getattr(t, "tensor_data_names", [])] or [t]
    return sum(x.numel() * x.element_size() for x in inner)
params = sum(nbytes(p) for p in scorer.model.parameters())
figures = {"imports_kib": before, "peak_kib": peak, "rss_kib": rss, "scored_kib": scored, "anon_kib": anon}
figures["file_kib"] = file
print(json.dumps({**figures, "param_bytes": params}))
"""


def _machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f}"


def _checkpoint(root: Path, **overrides):
    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
    from tests.factories import tiny_config, tiny_model, write_checkpoint

    model = tiny_model(seed=3, config=tiny_config(**overrides)) if overrides else tiny_model(seed=3)
    return write_checkpoint(model, root / "model", tokenizer_dir=build_tiny_tokenizer(root / "tok")).path


def bench_scores(args: argparse.Namespace) -> None:
    from scipy.stats import pearsonr, spearmanr

    from iqa_cli.scoring.scorer import Scorer

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(np.clip(rng.normal(rng.uniform(0, 255), rng.uniform(5, 80), (40, 48, 3)), 0, 255).astype("u1"))
        for _ in range(args.images)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = _checkpoint(Path(tmp))
        result = {}
        for mode in (None, "int8"):
            scorer = Scorer.from_pretrained(path, device="cpu", dtype="float32", quantize=mode)
            result[mode] = np.array([r.score for r in scorer.score(images, batch_size=16)])
    a, b = result[None], result["int8"]
    print(f"tiny checkpoint (seed 3), {args.images} images; {_machine()}")
    print(f"  float32 scores: mean {a.mean():.4f}, std {a.std():.4f}, range {a.min():.4f}..{a.max():.4f}")
    print(
        f"  int8 vs float32: max |diff| {np.abs(a - b).max():.4f}, mean |diff| {np.abs(a - b).mean():.4f}, "
        f"SRCC {spearmanr(a, b)[0]:.4f}, PLCC {pearsonr(a, b)[0]:.4f}"
    )


def bench_memory(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _checkpoint(
            Path(tmp),
            hidden_size=args.width,
            intermediate_size=args.width * 11 // 4,
            num_hidden_layers=args.layers,
            num_attention_heads=args.width // 64,
            num_key_value_heads=args.width // 64,
        )
        stored = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
        print(f"LLM {args.width} wide, {args.layers} layers: {stored / 2**20:.0f} MiB of float32 weights; {_machine()}")
        for mode in ("", "int8"):
            out = subprocess.run(
                [sys.executable, "-c", MEASURE, str(path), mode],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                cwd=Path(__file__).resolve().parents[1],
            )
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            mib = {k: v / 1024 for k, v in figures.items() if k.endswith("_kib")}
            print(
                f"  {mode or 'float32':8s} after imports {mib['imports_kib']:5.0f} MiB; loading: peak "
                f"{mib['peak_kib']:5.0f} MiB, then {mib['rss_kib']:5.0f} MiB resident; peak after scoring one image "
                f"{mib['scored_kib']:5.0f} MiB (anonymous {mib['anon_kib']:5.0f}, file-backed {mib['file_kib']:5.0f}); "
                f"parameters {figures['param_bytes'] / 2**20:4.0f} MiB"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    scores = sub.add_parser("scores")
    scores.add_argument("--images", type=int, default=64)
    memory = sub.add_parser("memory")
    memory.add_argument("--width", type=int, default=1024)
    memory.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    bench_scores(args) if args.mode == "scores" else bench_memory(args)


if __name__ == "__main__":
    main()
