"""`iqa demo`: the whole loop (prepare -> train -> score -> eval) on a CPU in a few minutes, with no download.

It writes a synthetic IQA dataset and a tiny random-init mPLUG-Owl2 checkpoint in the released layout
(`iqa_cli.synthetic`, `iqa_cli.models.mplug_owl2.tiny`), then runs the four commands a user would type, each
in its own process, printing each command line before its output so it can be copied. The training settings are
those the learnability tests use for DeQA-Score; the model starts from random weights, so the SRCC it reaches on
the held-out images is learned, not loaded.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from iqa_cli.errors import UserError

N_IMAGES = 1200
IMAGE_SIZE = (112, 96)  # width, height of the synthetic images
MODEL_SIDE = 112  # the tiny model's input size (8 x 8 ViT patches)
DATASET = "demo"
MARKER = "iqa-demo.json"  # what makes a folder a demo folder that a second `iqa demo` may reuse
# The learnability test's DeQA-Score settings: 8 epochs of 8 image pairs, a high learning rate for a
# random-init model, the scoring prompt's layout; gradient checkpointing only costs time at this size.
TRAIN_ARGS = ("--method", "deqa", "--epochs", "8", "--batch-size", "8", "--lr", "1e-3", "--layout", "scoring",
              "--no-gradient-checkpointing")  # fmt: skip
# A 64-wide model gains nothing from intra-op threads; on a busy 2-core machine spinning OpenMP threads
# made training four times slower. The commands that run the model say so on their command line.
THREAD_ENV = {"OMP_NUM_THREADS": "1"}


class DemoPaths:
    """Where the demo keeps each file, under `root` (relative stays relative: the printed commands use it)."""

    def __init__(self, root: Path):
        self.root = root
        self.images = root / "data" / "images"
        self.scores_csv = root / "data" / "scores.csv"
        self.model = root / "tiny-mplug-owl2"
        self.data_dir = root / "iqa-data"
        self.meta = self.data_dir / f"{DATASET}.parquet"
        self.run = root / "run"
        self.predictions = root / "predictions.parquet"
        self.report = root / "eval.json"


@dataclass
class DemoResult:
    paths: DemoPaths
    srcc: float
    plcc: float
    n_test: int
    seconds: float


def commands(paths: DemoPaths) -> list[tuple[dict[str, str], list[str]]]:
    """The four steps as (environment, arguments after `iqa`)."""
    return [
        ({}, ["prepare", "custom", "--csv", str(paths.scores_csv), "--images", str(paths.images),
              "--image-col", "image", "--mos-col", "mos", "--std-col", "std", "--name", DATASET,
              "--data-dir", str(paths.data_dir)]),
        (THREAD_ENV, ["train", "--datasets", DATASET, "--data-dir", str(paths.data_dir), "--model", str(paths.model),
                      "--out", str(paths.run), *TRAIN_ARGS]),
        (THREAD_ENV, ["score", str(paths.images), "--out", str(paths.predictions), "--model", str(paths.run)]),
        ({}, ["eval", str(paths.predictions), "--gt", str(paths.meta), "--json", str(paths.report)]),
    ]  # fmt: skip


def command_line(env: dict[str, str], args: list[str]) -> str:
    """What a user would type: `VAR=value iqa ARGS`, quoted for a POSIX shell."""
    prefix = "".join(f"{key}={shlex.quote(value)} " for key, value in env.items())
    return prefix + shlex.join(["iqa", *args])


def _check_folder(root: Path) -> bool:
    """True when `root` is a folder of an earlier demo (reused: finished steps are not redone)."""
    if (root / MARKER).is_file():
        return True
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file; iqa demo needs a new or empty folder")
    if root.is_dir() and any(root.iterdir()):
        raise UserError(f"{root} is not empty and holds no earlier demo; give a new or empty folder")
    return False


def write_inputs(paths: DemoPaths, say: Callable[[str], None]) -> None:
    """The synthetic dataset and the tiny random-init checkpoint."""
    from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint
    from iqa_cli.synthetic import STRENGTHS, make_synthetic_iqa

    paths.root.mkdir(parents=True, exist_ok=True)
    make_synthetic_iqa(paths.scores_csv.parent, N_IMAGES, size=IMAGE_SIZE)
    say(
        f"wrote {N_IMAGES} synthetic {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} images to {paths.images} (blur, JPEG and "
        f"noise at {STRENGTHS} strengths) and their human-like scores to {paths.scores_csv} (image, mos, std)"
    )
    write_tiny_checkpoint(paths.model, image_size=MODEL_SIDE)
    say(
        f"wrote a tiny random-init mPLUG-Owl2 ({MODEL_SIDE} px, 64-wide 2-layer LLM, its own small tokenizer) "
        f"in the released layout to {paths.model}"
    )
    marker = {"images": N_IMAGES, "model": str(paths.model), "commands": [command_line(*c) for c in commands(paths)]}
    (paths.root / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def run_demo(root: Path, say: Callable[[str], None] = print) -> DemoResult:
    """Writes the inputs (unless `root` holds an earlier demo) and runs the four commands in subprocesses,
    their output going straight to this process's stdout/stderr."""
    start = time.perf_counter()
    paths = DemoPaths(Path(root))
    if _check_folder(paths.root):
        say(f"{paths.root} holds an earlier demo: reusing its data and model")
    else:
        write_inputs(paths, say)
    for env, args in commands(paths):
        line = command_line(env, args)
        say(f"\n$ {line}")
        sys.stdout.flush()
        proc = subprocess.run([sys.executable, "-m", "iqa_cli", *args], env={**os.environ, **env}, check=False)
        if proc.returncode != 0:
            error = UserError(f"iqa demo: `{line}` failed with exit code {proc.returncode}")
            error.exit_code = proc.returncode
            raise error
    report = json.loads(paths.report.read_text(encoding="utf-8"))
    (row,) = [r for r in report["results"] if r["dataset"] == DATASET]
    result = DemoResult(paths, row["srcc"], row["plcc"], row["n"], time.perf_counter() - start)
    say(
        f"\ndemo: a model trained from random weights reaches SRCC {result.srcc:.3f}, PLCC {result.plcc:.3f} "
        f"on {result.n_test} held-out images (an untrained one: about 0), in {result.seconds:.0f} s.\n"
        f"Files are in {paths.root}; run the commands above to repeat a step, or see README.md for your own data."
    )
    return result
