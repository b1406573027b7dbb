"""What runs inside each Ray actor of `iqa score --engine ray`: one model on one device, scoring the units the
driver hands it with `iqa score`'s own loop parts, and writing each finished unit into the shared sidecar.

The actor keeps one DataLoader for the whole run (its workers fork once, not once per unit): each worker takes
the next unit from a queue the driver fills (`FedUnits`), so a worker that ends a unit starts the next at once
and batches keep one shape across unit boundaries, as in a local run. When the queue is empty a worker hands
over the rows it holds (a padded batch), so the units in it finish and the driver hears of them. The loop runs
on a thread of the actor; the driver's calls (`give`, `finished`, `stop`) run beside it (a threaded actor).
Imports Ray nowhere: the driver wraps `UnitActor` with `ray.remote`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from iqa_cli.errors import UserError
from iqa_cli.scoring.loader import UnitStream

STOP = "stop"  # in the unit queue: this worker's last unit was handed out


class DecoderLost(Exception):
    """A decoding worker of this actor died (an image that kills its decoder): the driver takes the actor as lost,
    so its units go back and a unit that keeps killing its actors stops the run, naming it."""


class FedUnits(UnitStream):
    """A `UnitStream` whose workers take (unit, start) from a shared queue until `STOP`, yielding None while the
    queue is empty (the stream then hands over what it holds)."""

    def __init__(self, source: Any, units: Any, decode: Any, collate: Any):
        empty = np.zeros(0, dtype=np.int64)
        super().__init__(source, empty, empty, decode, collate)
        self.queue = units

    def assigned(self) -> Iterator[tuple[int, int] | None]:
        while True:
            try:
                item = self.queue.get(timeout=0.005)  # a unit just put may take a moment to arrive
            except queue.Empty:
                yield None
                item = self.queue.get()
            if item == STOP:
                return
            yield item


class UnitActor:
    """One model on this actor's device; `start` sets up the loop, `give` hands it units, `finished` reports them.

    Args:
        build: device -> the run's scorer (the driver's `build_scorer` with its options).
        gpu: a GPU actor (Ray gave it `num_gpus`; `cuda` is its GPU), else a CPU one.
        cwd: the driver's working folder: relative paths mean the same here when it exists on this node.
        threads: the user's OMP_NUM_THREADS, or None (then Ray's `1` is dropped and the cores are shared as in a
            local run: decoding workers first, the model's threads take the rest).
    """

    def __init__(self, build: Callable[[torch.device], Any], gpu: bool, cwd: str, threads: str | None):
        if os.path.isdir(cwd):
            os.chdir(cwd)
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads
        self.build, self.device = build, torch.device("cuda" if gpu else "cpu")
        self.scorer: Any = None
        self.condition = threading.Condition()
        self.completed: list[tuple[int, int]] = []  # (unit, rows this actor scored of it), not yet reported
        self.error: BaseException | None = None
        self.ended = False
        self.halt = False
        self.processed = 0
        self.thread: threading.Thread | None = None

    def load(self) -> dict[str, Any]:
        """Loads the model; what the driver's plan reads from a scorer, and where this actor runs."""
        import ray

        self.scorer = self.build(self.device)
        return {
            "metadata": dict(self.scorer.metadata),
            "level_names": list(self.scorer.level_names),
            "has_regressor": bool(self.scorer.has_regressor),
            "reasoning": bool(getattr(self.scorer, "reasoning", False)),
            "video_metadata": dict(getattr(self.scorer, "video_metadata", {})),
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }

    def start(
        self,
        writer: Any,
        *,
        size: int,
        auto: bool,
        workers: int | None,
        units: int,
        fast_decode: bool,
        load_image: Callable | None,
        sampling: Any,
        per_frame: bool,
        local_world_size: int,
    ) -> dict[str, int]:
        """Builds the loop (`iqa_cli.scoring.local.build_loop`, as a local run builds it) and starts it on a thread;
        returns the decoding workers and the call size it runs with. `workers` None: `iqa score`'s default for this
        node's share of cores; never more than the run's `units`."""
        from iqa_cli.process import cores, default_workers
        from iqa_cli.scoring.local import build_loop

        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, cores() // local_world_size))
        self.writer = writer
        self.queue = multiprocessing.Queue()
        workers = min(default_workers(local_world_size) if workers is None else workers, units)
        loop = build_loop(
            self.scorer,
            lambda decoder, collate: FedUnits(writer.source, self.queue, decoder, collate),
            size=size,
            auto=auto,
            workers=workers,
            fast_decode=fast_decode,
            load_image=load_image,
            sampling=sampling,
            per_frame=per_frame,
            local_world_size=local_world_size,
            in_order=False,
        )
        self.workers = max(1, workers)
        self.thread = threading.Thread(target=self._loop, args=(loop,), name="iqa-units", daemon=True)
        self.thread.start()
        return {"workers": workers, "size": loop.runner.size}

    def _loop(self, loop: Any) -> None:
        from iqa_cli.scoring.loader import device_batches, intra_op_threads
        from iqa_cli.scoring.local import out_of_memory

        rows: dict[int, int] = {}
        try:
            with torch.inference_mode(), intra_op_threads(loop.threads):
                for batch, visual in device_batches(loop.batches, self.device):
                    if self.halt:  # the run was stopped: what is scored is written below, as pieces
                        break
                    n = loop.step(self.writer, batch, visual)
                    units = batch["unit"].numpy()
                    for u in units[units >= 0].tolist():
                        rows[u] = rows.get(u, 0) + 1
                    with self.condition:
                        self.processed += n
                        self.completed += [(u, rows.pop(u, 0)) for u, _ in batch["done"]]
                        if batch["done"]:
                            self.condition.notify_all()
        except torch.OutOfMemoryError:
            self.error = UserError(out_of_memory(loop.runner.size))
        except BaseException as exc:  # reported to the driver by `finished`
            self.error = exc
        finally:
            self.writer.flush()  # the rows of unfinished units, as pieces
            loop.close()  # the workers stop now
            with self.condition:
                self.ended = True
                self.condition.notify_all()

    def give(self, units: list[tuple[int, int]]) -> None:
        """Units to score next, each from its start row (rows an earlier actor already wrote as pieces)."""
        for u, start in units:
            self.writer.starts[u] = start
            self.queue.put((u, start))

    def finished(self, timeout: float) -> list[tuple[int, int]]:
        """(unit, rows scored here) of the units written since the last call; waits up to `timeout` seconds for
        one. Raises what stopped the loop, once its finished units are reported."""
        with self.condition:
            if not self.completed and self.error is None and not self.ended:
                self.condition.wait(timeout)
            done, self.completed = self.completed, []
        if not done and self.error is not None:
            if isinstance(self.error, RuntimeError) and "DataLoader worker (pid" in str(self.error):
                raise DecoderLost(" ".join(str(self.error).split()))
            raise self.error
        return done

    def stop(self, timeout: float, now: bool = False) -> int:
        """No more units: the workers end and the rows of unfinished units are written as pieces; returns the rows
        this actor scored. `now` (the run was stopped): units not started are dropped and the loop ends at its
        next batch, rather than once every unit handed out is scored."""
        if self.thread is not None:
            if now:
                self.halt = True
                with contextlib.suppress(queue.Empty):
                    while True:
                        self.queue.get_nowait()
            for _ in range(self.workers):
                self.queue.put(STOP)
            self.thread.join(timeout)
        return self.processed
