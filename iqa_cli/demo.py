"""`iqa demo`: the whole loop (prepare -> train -> score -> eval) on a CPU in a few minutes, with no download.

It writes a synthetic IQA dataset and a tiny random-init mPLUG-Owl2 checkpoint in the released layout
(`iqa_cli.synthetic`, `iqa_cli.models.mplug_owl2.tiny`), then runs the four commands a user would type, each
in its own process, printing each command line before its output so it can be copied. The training settings are
those the learnability tests use for DeQA-Score; the model starts from random weights, so the SRCC it reaches on
the held-out images is learned, not loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from iqa_cli import interrupts
from iqa_cli.errors import UserError
from iqa_cli.files import atomic_write
from iqa_cli.paths import check_output_dir

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
    check_output_dir(root, "iqa demo")  # under a file, not writable, full: one line before anything is written
    return False


def write_inputs(paths: DemoPaths, say: Callable[[str], None]) -> None:
    """The synthetic dataset and the tiny random-init checkpoint; removed again if writing them fails."""
    created = not paths.root.exists()
    try:
        _write_inputs(paths, say)
    except BaseException:  # the disk filled up, a stop: nothing half-written stays (a rerun starts afresh)
        if created:
            shutil.rmtree(paths.root, ignore_errors=True)
        else:
            for child in paths.root.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        raise


def _write_inputs(paths: DemoPaths, say: Callable[[str], None]) -> None:
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
    reused = _check_folder(paths.root)
    if reused:
        say(f"{paths.root} holds an earlier demo: reusing its data and model")
    else:
        write_inputs(paths, say)
    for env, args in commands(paths):
        line = command_line(env, args)
        say(f"\n$ {line}")
        sys.stdout.flush()
        code = _run_step([sys.executable, "-m", "iqa_cli", *args], {**os.environ, **env}, line)
        if code != 0:
            error = UserError(f"iqa demo: `{line}` failed with exit code {code}")
            error.exit_code = code
            raise error
    report = json.loads(paths.report.read_text(encoding="utf-8"))
    (row,) = [r for r in report["results"] if r["dataset"] == DATASET]
    marker = json.loads((paths.root / MARKER).read_text(encoding="utf-8"))
    seconds = time.perf_counter() - start
    if "seconds" in marker:  # the steps were done by the first run; this one found them finished
        timing = f"in {marker['seconds']:.0f} s (the first run; this one reused its results in {seconds:.0f} s)"
    else:
        marker["seconds"] = round(seconds, 1)  # printed from the stored value so a rerun prints the same figure
        timing = f"in {marker['seconds']:.0f} s"
        atomic_write(paths.root / MARKER, json.dumps(marker, indent=2) + "\n")
    result = DemoResult(paths, row["srcc"], row["plcc"], row["n"], marker["seconds"])
    say(
        f"\ndemo: a model trained from random weights reaches SRCC {result.srcc:.3f}, PLCC {result.plcc:.3f} "
        f"on {result.n_test} held-out images (an untrained one: about 0), {timing}.\n"
        f"Files are in {paths.root}; run the commands above to repeat a step, or see README.md for your own data."
    )
    return result


class DemoInterrupted(interrupts.Interrupted):
    """A stop while a step ran: the step saved its work (its own line says what) and the demo goes on from there."""

    def __init__(self, signum: int, line: str):
        super().__init__(signum)
        self.line = line

    def __str__(self) -> str:
        return f"iqa demo: interrupted by {self.name} during `{self.line}`; run iqa demo again to go on"


def _run_step(command: list[str], env: dict[str, str], line: str) -> int:
    """Runs one step in its own process group and waits for it. A stop this process gets (alone, or with its group)
    is handed to the step exactly once, and the step is waited for while it saves its work: never killed."""
    own_group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}  # 3.10: no kwarg
    proc = subprocess.Popen(command, env=env, **own_group)
    stop = None
    while True:
        try:
            return_code = proc.wait()
            break
        except interrupts.Interrupted as exc:
            stop = stop or exc.signum
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(exc.signum)
    if stop is not None:
        raise DemoInterrupted(stop, line)
    return return_code
