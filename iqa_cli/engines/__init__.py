"""Where `iqa score`'s units are scored: `--engine local` (this process; under torchrun each rank its fixed
share) or `--engine ray` (Ray actors on a cluster, each taking the next unit as it frees up).

The driver (`iqa_cli.scoring.driver`) checks, plans, resumes and assembles the output the same way whatever the
engine; an engine only loads the model where it runs and scores the units it is handed, writing each finished
unit through the run's `UnitWriter` into the shared sidecar. So the output, and what a rerun resumes, never
depend on the engine. Adding an engine is a module with a class like `LocalEngine` and a line in `ENGINES`.
Imports nothing heavy: `iqa score --help` and the option checks load no engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from iqa_cli.errors import UserError

# --engine NAME -> "module:class" of the engine
ENGINES: dict[str, str] = {
    "local": "iqa_cli.engines:LocalEngine",
    "ray": "iqa_cli.engines.ray:RayEngine",
}

Build = Callable[[Any], Any]  # torch.device -> the run's scorer on that device (`driver.build_scorer`)


class LocalEngine:
    """This process scores its units (`iqa_cli.scoring.local.score_units`) with the model loaded here."""

    name = "local"

    def __init__(self, config: Any):
        self.config = config

    @staticmethod
    def check(config: Any) -> None:
        other = f"applies to --engine ray (this run's engine is {config.engine})"
        if config.ray_address is not None:
            raise UserError(f"--ray-address {config.ray_address}: {other}")
        if config.gpus_per_actor != 1.0:
            raise UserError(f"--gpus-per-actor {config.gpus_per_actor:g}: {other}")

    def resolve_device(self, device: str, environment: Any) -> Any:
        from iqa_cli import distributed

        return distributed.resolve_device(device, environment)

    def scorer(self, build: Build, device: Any) -> Any:
        return build(device)

    def score_units(self, scorer: Any, *args: Any, **kwargs: Any) -> int:
        from iqa_cli.scoring import local

        return local.score_units(scorer, *args, **kwargs)

    def close(self) -> None:
        pass


def engine_class(name: str) -> type:
    if name not in ENGINES:
        raise UserError(f"--engine {name}: unknown engine (use {' or '.join(ENGINES)})")
    module, _, attribute = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def check(config: Any) -> None:
    """The engine's checks of the options (Ray installed, the cluster reachable, ...), before any work.

    Raises:
        UserError: the first mistake found.
    """
    engine_class(config.engine).check(config)


def open_engine(config: Any) -> Any:
    """The engine of a checked `ScoreConfig` (connects to nothing yet)."""
    return engine_class(config.engine)(config)
