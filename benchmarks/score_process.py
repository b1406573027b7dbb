"""One measured process of `bench_score.py cpu`: `iqa score` itself (`iqa_cli.cli.main`), writing timestamps
(model load start and end, each batch's end, output written) to a marks file that the parent turns into phases.

Nothing heavy is imported before the command imports it: the start-up measured is the command's own.

    .venv/bin/python benchmarks/score_process.py --folder F --model M --out O --marks FILE [--workers 2] [--fast-decode]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _child_marks(path: str):
    """In a measured child process: appends `name seconds-since-epoch` lines to `path`, unbuffered, so a
    process that leaves with `os._exit` keeps them."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def mark(name: str) -> None:
        os.write(fd, f"{name} {time.time():.6f}\n".encode())

    return mark


def _instrument_on_import(hooks: dict) -> None:
    """Runs `hooks[module name](module)` right after that module is imported, without importing it (and torch)
    earlier than the code under measurement does."""
    import importlib.abc
    import importlib.util

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in hooks:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            run = spec.loader.exec_module

            def exec_module(module, run=run, hook=hooks.pop(name)):
                run(module)
                hook(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


def child_iqa_score(args: argparse.Namespace) -> None:
    """`iqa score` itself (`iqa_cli.cli.main`), with marks: model load start and end, each batch's end, and
    `score_images`' return. The process exits as the CLI makes it exit."""
    mark = _child_marks(args.marks)

    def scorer_hooks(module) -> None:
        load, score_batch = module.Scorer.from_pretrained.__func__, module.Scorer.score_batch

        def from_pretrained(cls, *a, **k):
            mark("load_start")
            scorer = load(cls, *a, **k)
            mark("load_end")
            return scorer

        def timed_batch(self, visual):
            result = score_batch(self, visual)
            mark("batch")
            return result

        module.Scorer.from_pretrained, module.Scorer.score_batch = classmethod(from_pretrained), timed_batch

    def pipeline_hooks(module) -> None:
        score_images = module.score_images

        def timed(*a, **k):
            summary = score_images(*a, **k)
            mark("output_end")
            return summary

        module.score_images = timed

    _instrument_on_import({"iqa_cli.scoring.scorer": scorer_hooks, "iqa_cli.scoring.driver": pipeline_hooks})
    from iqa_cli.cli import entry

    sys.argv = ["iqa", "score", args.folder, "--model", args.model, "--out", args.out, "--device", "cpu"]
    sys.argv += ["--dtype", "float32", "--batch-size", str(args.batch_size), "--workers", str(args.workers), "-q"]
    sys.argv += ["--fast-decode"] if args.fast_decode else []
    entry()  # as the `iqa` script: main, then the process's own exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for option in ("--folder", "--model", "--out", "--marks"):
        parser.add_argument(option, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fast-decode", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # iqa_cli from this checkout
    child_iqa_score(args)


if __name__ == "__main__":
    main()
