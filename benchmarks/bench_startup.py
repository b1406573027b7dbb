"""Fixed costs of `iqa score` and of the quick commands, each the old way against the current one in one run.

Every measurement runs in fresh Python processes (what is imported, and what garbage exists at exit, depend
on the process's history), old and new interleaved, `--repeats` times; it prints the median and the range.

- build: the model skeleton the loader fills. old: `MPLUGOwl2ForCausalLM(config)` under `torch.device("meta")`
  (initializers and the abstractor's position tables run on meta, whose kernels import torch._dynamo);
  new: `build_skeleton(config)`. Seconds of the build alone (torch already imported), and whether
  torch._dynamo got imported. The 7B config by default (`--size`), as `iqa score` builds it.
- parts: a unit's table as `iqa score` builds it (4,096 rows) in a process with pyarrow imported. old: `pa.array`
  over numpy, as the writer did (tests/test_score_store.py keeps that construction as the reference; it
  imports pandas); new: `UnitWriter._table` (Arrow buffers from numpy). Seconds, and whether pandas got imported.
- exit: `iqa score` on 8 small images with a tiny released-layout checkpoint, run by `iqa_cli.cli.main()` in a
  fresh process; the time from the moment main() returns to the end of the process. "no freeze": without the
  `gc.freeze()` that main() registers to run at exit (unregistered again); "freeze": main() alone, a normal
  interpreter exit; "os._exit": as the `iqa` script runs (`iqa_cli.process.run_then_exit`: atexit handlers,
  flush, `os._exit`).
- threads: `score_images` on `--images` generated 1024x768 JPEGs (default 96: 6 batches of 16, 2 workers) with
  the tiny model reading 448 px in the real 32x32 patch grid, on the CPU, in fresh processes. old: OpenMP's
  default wait policy and torch's default thread count; new: as `iqa score` runs (OMP_WAIT_POLICY=PASSIVE set
  before torch is imported, the model on the cores the workers leave). The main process's CPU time per
  batch and the loop's wall time (model loading excluded), and the largest score difference.
- fixed: where one `iqa score` run's time goes (current code only; each item's old way is in its own mode):
  `main()` in a fresh process on `--images` 1024x768 JPEGs (2 workers, batch 16), the tiny model at 448 px
  in the 32x32 patch grid: interpreter start + imports (torch, the pipeline), model load, first batch
  (loop start to the first rows written), the other batches, merge + output, exit after main() returns.
- cli: wall time of `iqa --version` and `iqa score --help` (`python -m iqa_cli`), the whole process. "old
  --version" adds what `--version` did before: import torch and probe `--device auto`.

    .venv/bin/python benchmarks/bench_startup.py build [--repeats 5] [--size mplug-owl2-7b]
    .venv/bin/python benchmarks/bench_startup.py parts [--repeats 5]
    .venv/bin/python benchmarks/bench_startup.py exit [--repeats 5]
    .venv/bin/python benchmarks/bench_startup.py threads [--repeats 5] [--images 96]
    .venv/bin/python benchmarks/bench_startup.py fixed [--repeats 5] [--images 96]
    .venv/bin/python benchmarks/bench_startup.py cli [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python(code: str, env: dict[str, str] | None = None) -> str:
    """Runs `code` in a fresh interpreter at the repository root; returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return result.stdout


def wall(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, cwd=REPO, capture_output=True, check=True)
    return time.perf_counter() - start


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):6.3f} s  (min {min(values):.3f}, max {max(values):.3f})"


def header() -> None:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load[0]:.2f}")


BUILD = """
    import sys, time
    import torch
    from iqa_cli.models.mplug_owl2.config import MPLUGOwl2Config
    from iqa_cli.models.mplug_owl2.model import MPLUGOwl2ForCausalLM, build_skeleton
    config = MPLUGOwl2Config.from_name({size!r})
    start = time.perf_counter()
    if {old!r}:
        with torch.device("meta"):
            model = MPLUGOwl2ForCausalLM(config)
    else:
        model = build_skeleton(config)
    print(time.perf_counter() - start, "torch._dynamo" in sys.modules)
"""


def bench_build(repeats: int, size: str) -> None:
    times: dict[str, list[float]] = {"old": [], "new": []}
    dynamo: dict[str, set[str]] = {"old": set(), "new": set()}
    for _ in range(repeats):
        for way in ("old", "new"):
            seconds, imported = python(BUILD.format(size=size, old=way == "old")).split()
            times[way].append(float(seconds))
            dynamo[way].add(imported)
    for way in ("old", "new"):
        print(f"build {size} {way}: {summary(times[way])}  torch._dynamo imported: {'/'.join(sorted(dynamo[way]))}")
    print(f"ratio old/new (medians): {statistics.median(times['old']) / statistics.median(times['new']):.1f}x")


PARTS = """
    import sys, time
    from pathlib import Path
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq, torch
    from tests.test_score_store import _batch, _reference_table, _result, _writer
    writer = _writer(Path({folder!r}), False, {{"shard": None, "meta": None}})
    batches = []
    for start in range(0, 4096, 16):
        batch = _batch([0] * 16, list(range(start, start + 16)), [1024] * 16, [None] * 16)
        batches.append((batch, _result(16, start, False)))
        writer.add(*batches[-1])
    start = time.perf_counter()
    table = _reference_table(batches, writer.schema) if {old!r} else writer._table(writer.pending[0].chunks)
    print(time.perf_counter() - start, "pandas" in sys.modules)
"""


def bench_parts(repeats: int) -> None:
    import tempfile

    times: dict[str, list[float]] = {"old": [], "new": []}
    pandas: dict[str, set[str]] = {"old": set(), "new": set()}
    for _ in range(repeats):
        for way in ("old", "new"):
            with tempfile.TemporaryDirectory() as folder:
                seconds, imported = python(PARTS.format(folder=folder, old=way == "old")).split()
            times[way].append(float(seconds))
            pandas[way].add(imported)
    for way in ("old", "new"):
        print(f"first part table {way}: {summary(times[way])}  pandas imported: {'/'.join(sorted(pandas[way]))}")
    print(f"ratio old/new (medians): {statistics.median(times['old']) / statistics.median(times['new']):.1f}x")


EXIT = """
    import atexit, gc, sys, time
    from iqa_cli.cli import main
    from iqa_cli.process import run_then_exit
    sys.argv = ["iqa", "score", {images!r}, "--model", {model!r}, "--out", {out!r}, "--overwrite", "--quiet"]

    def measured():
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, exc.code
        if {way!r} == "no freeze":
            atexit.unregister(gc.freeze)
        print(len(gc.get_objects()), time.time(), flush=True)

    run_then_exit(measured) if {way!r} == "os._exit" else measured()
"""


def tiny_run_files(folder: Path, images: int = 8) -> tuple[Path, Path]:
    """A tiny released-layout checkpoint (with its tokenizer) and a folder of small JPEGs."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
    from tests.factories import tiny_model, write_checkpoint

    model = write_checkpoint(tiny_model(seed=0), folder / "ckpt", tokenizer_dir=build_tiny_tokenizer(folder / "tok"))
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.jpg")
    return model.path, folder / "images"


def bench_exit(repeats: int) -> None:
    import tempfile

    times: dict[str, list[float]] = {"no freeze": [], "freeze": [], "os._exit": []}
    with tempfile.TemporaryDirectory() as folder:
        model, images = tiny_run_files(Path(folder))
        out = str(Path(folder) / "scores.parquet")
        for repeat in range(repeats):
            for way in list(times) if repeat % 2 == 0 else list(times)[::-1]:
                code = EXIT.format(images=str(images), model=str(model), out=out, way=way)
                objects, returned = python(code).split()
                times[way].append(time.time() - float(returned))
    print(f"objects alive when main() returns: {objects}")
    for way in times:
        print(f"exit after main() {way}: {summary(times[way])}")
    medians = {way: statistics.median(values) for way, values in times.items()}
    print(f"ratios (medians): no freeze / freeze {medians['no freeze'] / medians['freeze']:.1f}x, "
          f"freeze / os._exit {medians['freeze'] / medians['os._exit']:.1f}x")  # fmt: skip


THREADS = """
    import json, resource, sys, time
    if not {old!r}:
        from iqa_cli.process import configure_process
        configure_process()
    import torch
    import pyarrow.parquet as pq
    from iqa_cli.scoring import config, driver, local
    if {old!r}:
        local.model_threads = lambda *args: None
    loop = {{}}
    inner = local.score_units  # what the local engine calls

    def timed(*args, **kwargs):
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        processed = inner(*args, **kwargs)
        after = resource.getrusage(resource.RUSAGE_SELF)
        loop["wall"] = time.perf_counter() - start
        loop["cpu"] = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
        return processed

    local.score_units = timed
    planned = local.model_threads(torch.device("cpu"), 2, 1, torch.get_num_threads())
    loop["threads"] = torch.get_num_threads() if planned is None else planned
    from iqa_cli.model_options import ModelSpec
    options = config.ScoreConfig(out={out!r}, inputs=[{images!r}], model=ModelSpec({model!r}, dtype="float32"),
                                 workers=2, batch_size=16, overwrite=True, quiet=True)
    driver.score_images(options)
    loop["scores"] = pq.read_table({out!r}).column("score").to_pylist()
    print(json.dumps(loop))
"""


def bench_threads(repeats: int, images: int) -> None:
    import json
    import math
    import tempfile

    from bench_score import make_jpegs, tiny_checkpoint

    cpu: dict[str, list[float]] = {"old": [], "new": []}
    walls: dict[str, list[float]] = {"old": [], "new": []}
    scores: dict[str, list[float]] = {}
    batches = math.ceil(images / 16)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model = tiny_checkpoint(work, 448, 14).path
        make_jpegs(work / "images", images)
        for _ in range(repeats):
            for way in ("old", "new"):
                code = THREADS.format(old=way == "old", out=str(work / f"{way}.parquet"), images=str(work / "images"),
                                      model=str(model))  # fmt: skip
                loop = json.loads(python(code).splitlines()[-1])
                cpu[way].append(1000 * loop["cpu"] / batches)
                walls[way].append(loop["wall"])
                scores[way] = loop["scores"]
                print(f"  {way}: {loop['threads']} torch threads in the loop, main CPU {cpu[way][-1]:.0f} ms/batch, "
                      f"loop {loop['wall']:.2f} s", flush=True)  # fmt: skip
    for way in ("old", "new"):
        print(f"{way}: main-process CPU per batch median {statistics.median(cpu[way]):.0f} ms "
              f"({min(cpu[way]):.0f}-{max(cpu[way]):.0f}); loop wall {summary(walls[way])}")  # fmt: skip
    diff = max(abs(a - b) for a, b in zip(scores["old"], scores["new"], strict=True))
    print(f"CPU ratio old/new (medians): {statistics.median(cpu['old']) / statistics.median(cpu['new']):.2f}x; "
          f"wall ratio {statistics.median(walls['old']) / statistics.median(walls['new']):.2f}x; "
          f"largest score difference {diff:.2e}")  # fmt: skip


FIXED = """
    import json, sys, time
    marks = {{"started": time.time()}}
    from iqa_cli.cli import main
    from iqa_cli.process import run_then_exit
    import torch
    from iqa_cli.scoring import local, scorer, store
    marks["imported"] = time.time()
    load, score_units, add = scorer.Scorer.from_pretrained.__func__, local.score_units, store.UnitWriter.add

    def timed_load(cls, *args, **kwargs):
        marks["load_start"] = time.time()
        try:
            return load(cls, *args, **kwargs)
        finally:
            marks["loaded"] = time.time()

    def timed_loop(*args, **kwargs):
        marks["loop_start"] = time.time()
        processed = score_units(*args, **kwargs)
        marks["loop_end"] = time.time()
        return processed

    def timed_add(self, batch, result):
        marks.setdefault("first_batch", time.time())
        return add(self, batch, result)

    scorer.Scorer.from_pretrained = classmethod(timed_load)
    local.score_units, store.UnitWriter.add = timed_loop, timed_add
    sys.argv = ["iqa", "score", {images!r}, "--model", {model!r}, "--out", {out!r}, "--overwrite", "--quiet",
                "--workers", "2", "--batch-size", "16", "--dtype", "float32"]

    def measured():
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, exc.code
        marks["returned"] = time.time()
        print(json.dumps(marks), flush=True)

    run_then_exit(measured)  # and the process ends as the `iqa` script ends it
"""


def bench_fixed(repeats: int, images: int) -> None:
    import json
    import tempfile

    from bench_score import make_jpegs, tiny_checkpoint

    steps = {
        "start + imports": ("launched", "imported"),
        "model load": ("load_start", "loaded"),
        "first batch": ("loop_start", "first_batch"),
        "other batches": ("first_batch", "loop_end"),
        "merge + output": ("loop_end", "returned"),
        "exit": ("returned", "ended"),
        "total": ("launched", "ended"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in [*steps, "rest (inputs, plan)"]}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model = tiny_checkpoint(work, 448, 14).path
        make_jpegs(work / "images", images)
        code = FIXED.format(images=str(work / "images"), model=str(model), out=str(work / "scores.parquet"))
        for _ in range(repeats):
            launched = time.time()
            marks = json.loads(python(code).splitlines()[-1])
            marks.update(launched=launched, ended=time.time())
            for name, (a, b) in steps.items():
                seconds[name].append(marks[b] - marks[a])
            parts = sum(seconds[name][-1] for name in steps if name != "total")
            seconds["rest (inputs, plan)"].append(seconds["total"][-1] - parts)
    print(f"iqa score, {images} JPEGs 1024x768, 2 workers, batch 16, tiny model at 448 px; {repeats} runs")
    for name in seconds:
        print(f"{name:>19}: {summary(seconds[name])}")


def bench_cli(repeats: int) -> None:
    old_version = (
        "import sys, torch; from iqa_cli.distributed import resolve_device; resolve_device('auto');"
        "from iqa_cli.cli import main; sys.argv = ['iqa', '--version']; main()"
    )
    commands = {
        "old iqa --version": [sys.executable, "-c", old_version],
        "iqa --version": [sys.executable, "-m", "iqa_cli", "--version"],
        "iqa score --help": [sys.executable, "-m", "iqa_cli", "score", "--help"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, args in commands.items():
            times[name].append(wall(args))
    for name in commands:
        print(f"{name:>18}: {summary(times[name])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("build", "parts", "exit", "threads", "fixed", "cli"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="mplug-owl2-7b")
    parser.add_argument("--images", type=int, default=96)
    args = parser.parse_args()
    header()
    if args.mode == "build":
        bench_build(args.repeats, args.size)
    elif args.mode == "parts":
        bench_parts(args.repeats)
    elif args.mode == "exit":
        bench_exit(args.repeats)
    elif args.mode == "threads":
        bench_threads(args.repeats, args.images)
    elif args.mode == "fixed":
        bench_fixed(args.repeats, args.images)
    else:
        bench_cli(args.repeats)


if __name__ == "__main__":
    main()
