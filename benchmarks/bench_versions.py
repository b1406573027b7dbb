"""Two checkouts of `iqa` scoring the same inputs, alternating: did a change move the throughput of `iqa score`?

Each side is a Python interpreter whose `iqa_cli` is one checkout (a venv with it installed editable, e.g. a
`git worktree` of the old commit). The script writes `--images` photo-like 1024x768 JPEGs as a folder and as
WebDataset shards (`--per-shard` each), and a tiny random mPLUG-Owl2 at 448 px (so decoding and preprocessing are
the real per-image work), then runs `python -m iqa_cli score` launch to exit, side A and side B alternating (the
order flips every round), `--rounds` times per input kind, and prints each side's median images/s (images over
wall time of the whole command: start-up, model load, scoring, output) and the ratio B/A. Alternating in one run
makes the ratio fair on a machine whose load changes.

    .venv/bin/python benchmarks/bench_versions.py --a /path/to/old/.venv/bin/python --b .venv/bin/python \\
        [--images 320] [--rounds 4] [--workers 2] [--inputs folder,shards]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_score, when run as a script

from bench_score import make_jpegs, tiny_checkpoint


def _shards(folder: Path, out: Path, per_shard: int) -> str:
    out.mkdir()
    files = sorted(folder.iterdir())
    for s in range(0, len(files), per_shard):
        with tarfile.open(out / f"{s // per_shard:05d}.tar", "w") as tar:
            for path in files[s : s + per_shard]:
                tar.add(path, arcname=path.name)
    return f"{out}/*.tar"


def _run(python: str, source: str, out: Path, model: Path, workers: int) -> float:
    target = str(out) if out.suffix else f"{out}/"  # a folder output for shards, as both versions spell it
    command = [python, "-m", "iqa_cli", "score", source, "--out", target, "--model", str(model), "--device", "cpu",
               "--dtype", "float32", "--batch-size", "16", "--workers", str(workers), "-q", "--overwrite"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONPATH")}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=out.parent)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{python}: exit {result.returncode}\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="Python of side A (e.g. the old checkout's venv)")
    parser.add_argument("--b", required=True, help="Python of side B")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--per-shard", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--inputs", default="folder,shards")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-versions-") as tmp:
        work = Path(tmp)
        make_jpegs(work / "photos", args.images)
        sources = {"folder": str(work / "photos")}
        sources["shards"] = _shards(work / "photos", work / "shards", args.per_shard)
        model = tiny_checkpoint(work, 448).path  # 2x2 patches: a cheap model, the real 448 px decode work
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}; "
              f"{args.images} JPEGs 1024x768, tiny mPLUG-Owl2 at 448 px, --workers {args.workers}, batch 16; "
              f"A = {args.a}, B = {args.b}")  # fmt: skip
        for kind in args.inputs.split(","):
            seconds: dict[str, list[float]] = {"A": [], "B": []}
            for r in range(args.rounds):
                order = ("A", "B") if r % 2 == 0 else ("B", "A")
                for side in order:
                    python = args.a if side == "A" else args.b
                    out = work / (f"{kind}-{side}.parquet" if kind == "folder" else f"{kind}-{side}")
                    seconds[side].append(_run(python, sources[kind], out, model, args.workers))
            rate = {side: args.images / statistics.median(s) for side, s in seconds.items()}
            spread = {side: f"{min(s):.2f}-{max(s):.2f} s" for side, s in seconds.items()}
            print(f"  {kind:7s} A {rate['A']:6.1f} images/s ({spread['A']})   B {rate['B']:6.1f} images/s "
                  f"({spread['B']})   B/A {rate['B'] / rate['A']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
