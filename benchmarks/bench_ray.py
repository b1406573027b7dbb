"""`iqa score --engine ray` against the local engine on this machine, in one run (a local Ray the bench starts,
with every core).

- images: `score_images` on `--images` generated 1024x768 JPEGs (default 1,000), the tiny model reading 448 px
  in the real 32x32 patch grid, CPU, float32, batch 16, the default workers; the local engine and `--engine ray`
  interleaved, `--repeats` times. Images/s is what `iqa score` reports: the scoring loop, the model already
  loaded (in this process, or in the actor) - the steady state. Wall is the whole `score_images` call (Ray's own
  start-up is not in it: the bench starts Ray once, as a cluster that is already up). The scores of both
  engines are compared.
- units: `--units` units of one 8x8 PNG each (default 10,000) and the fake row-wise scorer of
  tests/test_score_pipeline.py (no model): what the engine costs per unit on top of the local loop, from the
  loop times, (ray - local) / units. Both write one sidecar file per unit and assemble them. The model calls
  of each engine are counted too (the same count: no half batches for units handed out late).

    .venv/bin/python benchmarks/bench_ray.py images [--images 1000] [--repeats 3]
    .venv/bin/python benchmarks/bench_ray.py units [--units 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.*, and bench_score's helpers, when run as a script
sys.path.insert(0, str(REPO / "benchmarks"))


def start_ray() -> None:
    import ray

    env = {"PYTHONPATH": str(REPO)}  # the actors import tests.test_score_pipeline (the fake scorer)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})


def header() -> None:
    import ray

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.2f}; "
        f"ray {ray.__version__}",
        flush=True,
    )


def run(config, factory=None) -> tuple[float, float, float]:
    """(images/s of the loop, loop seconds, wall seconds) of one `score_images`."""
    from iqa_cli.scoring.driver import score_images

    start = time.perf_counter()
    summary = score_images(config, scorer_factory=factory)
    return summary.images_per_second, summary.seconds, time.perf_counter() - start


def bench_images(images: int, repeats: int) -> None:
    import pandas as pd
    from bench_score import make_jpegs, tiny_checkpoint

    from iqa_cli.model_options import ModelSpec
    from iqa_cli.scoring.config import ScoreConfig

    speed: dict[str, list[float]] = {"local": [], "ray": []}
    walls: dict[str, list[float]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model = tiny_checkpoint(work, 448, 14).path
        make_jpegs(work / "images", images)
        for r in range(repeats):
            for engine in ("local", "ray"):
                config = ScoreConfig(
                    out=work / f"{engine}.parquet", inputs=[str(work / "images")], engine=engine, quiet=True,
                    model=ModelSpec(str(model), dtype="float32"), device="cpu", batch_size=16, overwrite=True,
                )  # fmt: skip
                per_second, loop, seconds = run(config)
                speed[engine].append(per_second)
                walls[engine].append(seconds)
                print(f"  {r + 1}/{repeats} {engine:5s}: {per_second:6.1f} images/s (loop {loop:.1f} s, wall "
                      f"{seconds:.1f} s)", flush=True)  # fmt: skip
        local, remote = pd.read_parquet(work / "local.parquet"), pd.read_parquet(work / "ray.parquet")
        same = local["image"].tolist() == remote["image"].tolist()
        diff = float((local["score"] - remote["score"]).abs().max())
    for engine in ("local", "ray"):
        print(f"{engine:5s}: median {statistics.median(speed[engine]):6.1f} images/s (min {min(speed[engine]):.1f}, "
              f"max {max(speed[engine]):.1f}); wall median {statistics.median(walls[engine]):.1f} s")  # fmt: skip
    ratio = statistics.median(speed["ray"]) / statistics.median(speed["local"])
    print(f"ray/local images/s (medians): {ratio:.3f}; same rows in the same order: {same}; "
          f"largest |score difference| {diff:.1e}")  # fmt: skip


class CountedScorer:
    """The fake scorer, appending a line to `log` at each model call (in whichever process scores)."""

    def __init__(self, log: str):
        self.log = log

    def __call__(self, device):
        from tests.test_score_pipeline import FakeScorer

        log = self.log

        class Counted(FakeScorer):
            def score_pixels(self, pixel_values):
                with open(log, "a") as file:
                    file.write("1\n")
                return super().score_pixels(pixel_values)

        return Counted(device)


def bench_units(units: int, repeats: int) -> None:
    import numpy as np
    import pytest
    from PIL import Image

    from iqa_cli.scoring.config import ScoreConfig

    patch = pytest.MonkeyPatch()
    patch.setattr("iqa_cli.sources.files.MIN_FILES_PER_UNIT", 1)
    patch.setattr("iqa_cli.sources.files.MAX_FILES_PER_UNIT", 1)
    loops: dict[str, list[float]] = {"local": [], "ray": []}
    calls: dict[str, set[int]] = {"local": set(), "ray": set()}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "images").mkdir()
        pixels = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(work / "images" / "00000.png")
        for i in range(1, units):
            os.link(work / "images" / "00000.png", work / "images" / f"{i:05d}.png")
        for r in range(repeats):
            for engine in ("local", "ray"):
                config = ScoreConfig(
                    out=work / f"{engine}.parquet", inputs=[str(work / "images")], engine=engine, quiet=True,
                    batch_size=16, workers=1, overwrite=True,
                )  # fmt: skip
                log = work / f"{engine}-{r}.calls"
                _, loop, seconds = run(config, CountedScorer(str(log)))
                loops[engine].append(loop)
                calls[engine].add(len(log.read_text().split()))
                print(f"  {r + 1}/{repeats} {engine:5s}: loop {loop:.1f} s for {units} units (wall {seconds:.1f} s)",
                      flush=True)  # fmt: skip
    local, remote = statistics.median(loops["local"]), statistics.median(loops["ray"])
    print(
        f"{units} units of one image: loop median local {local:.2f} s, ray {remote:.2f} s; model calls local "
        f"{'/'.join(map(str, sorted(calls['local'])))}, ray {'/'.join(map(str, sorted(calls['ray'])))}"
    )
    print(f"ray's scheduling overhead per unit: {1000 * (remote - local) / units:.2f} ms "
          f"(local {1000 * local / units:.2f} ms per unit, ray {1000 * remote / units:.2f} ms)")  # fmt: skip
    patch.undo()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["images", "units"])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--units", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    start_ray()
    header()
    if args.mode == "images":
        bench_images(args.images, args.repeats)
    else:
        bench_units(args.units, args.repeats)


if __name__ == "__main__":
    main()
