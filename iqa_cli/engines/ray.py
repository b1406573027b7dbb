"""`iqa score --engine ray`: the run's units scored by Ray actors that take the next unit as they free up; and
`RayScorer`, `iqa score`'s values as a class for users' own Ray Data pipelines.

The driver (`iqa_cli.scoring.driver`) checks, plans, resumes and assembles exactly as for a local run; this
engine only replaces the local loop. Each actor (`ray_worker.UnitActor`: one per GPU, `--gpus-per-actor`, or one
per node on a cluster without GPUs) loads the model once and runs `iqa score`'s loop parts on the units it is
handed, its own DataLoader workers decoding; every finished unit is written atomically into the sidecar on
storage all nodes mount, as a local run writes it. The driver hands each actor a few units ahead of its
decoding workers and one more whenever it reports one finished, so a slow node takes fewer, and a node that
joins gets actors within seconds. An actor that dies (its node lost, a kill) is replaced where resources allow,
and its unfinished units go back in the queue from the end of the pieces it wrote. A driver killed at any
moment takes its actors with it (they are owned by its job); the same command again resumes from the sidecar.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iqa_cli.engines import Build
from iqa_cli.errors import UserError

CONNECT_TIMEOUT = 5.0  # seconds to reach --ray-address before saying it cannot be reached
POLL_SECONDS = 2.0  # the longest an actor's `finished` call waits for a unit before answering (a death answers at once)
GROW_SECONDS = 5.0  # how often the driver looks for new nodes or GPUs (and replaces lost actors)
MAX_LOSSES = 3  # actors lost while one unit was in them, or while loading the model, before the run gives up
INSTALL = "pip install 'iqa-cli[ray]'"


class RayEngine:
    """Ray actors score the units; the driver hands them out and reports progress."""

    name = "ray"

    def __init__(self, config: Any):
        self.config = config
        self.pool: ActorPool | None = None
        self.started_ray = False

    @staticmethod
    def check(config: Any) -> None:
        """Ray installed, the options valid, paths absolute when other nodes read them, the cluster reachable."""
        from iqa_cli import distributed

        try:
            import ray  # noqa: F401
        except ImportError:
            raise UserError(f"--engine ray: Ray is not installed ({INSTALL})") from None
        if distributed.env().is_distributed:
            raise UserError("--engine ray: start it as one process, not under torchrun (Ray places the units)")
        g = config.gpus_per_actor
        if not g > 0 or (g > 1 and not float(g).is_integer()):
            raise UserError(
                f"--gpus-per-actor {g:g}: use a fraction up to 1 (0.5: two actors per GPU) or a whole number"
            )
        if config.device not in ("auto", "cpu", "cuda"):
            raise UserError(
                f"--device {config.device}: with --engine ray each actor computes on the GPU Ray gives it; use "
                "auto, cuda or cpu"
            )
        address = config.ray_address or os.environ.get("RAY_ADDRESS") or None
        if address is not None and address != "local":
            check_shared_paths(config)
        if address not in (None, "auto", "local"):
            probe(address, "--ray-address" if config.ray_address else "RAY_ADDRESS")

    def resolve_device(self, device: str, environment: Any) -> Any:
        """The driver computes nothing: each actor takes its own device."""
        import torch

        return torch.device("cpu")

    def scorer(self, build: Build, device: Any) -> RemoteScorer:
        """Connects, starts the actors (each loading the model) and returns the first one's description of it."""
        import ray

        self._connect()
        if sum(1 for node in ray.nodes() if node["Alive"]) > 1:  # other nodes open the paths too
            check_shared_paths(self.config)
        self.pool = ActorPool(build, self.config)
        return self.pool.first()

    def score_units(
        self,
        scorer: RemoteScorer,
        source: Any,
        units: np.ndarray,
        starts: np.ndarray,
        writer: Any,
        *,
        batch_size: int | None,
        workers: int | None,
        fast_decode: bool = False,
        load_image: Any = None,
        sampling: Any = None,
        per_frame: bool = False,
        local_world_size: int = 1,
        progress: Any = None,
        sidecar: Path,
    ) -> int:
        """Scores `units` on the actors (unit `units[i]` from row `starts[i]`); returns the rows scored."""
        import ray

        from iqa_cli.progress import NullBar
        from iqa_cli.scoring.config import interruptible
        from iqa_cli.scoring.local import call_size

        pool = scorer.pool
        size = call_size(batch_size, scorer.device, source, units, starts)
        options = {
            "size": size,
            "auto": batch_size is None and pool.gpu,
            "workers": workers,
            "units": len(units),
            "fast_decode": fast_decode,
            "load_image": load_image,
            "sampling": sampling,
            "per_frame": per_frame,
        }
        dispatch = Dispatch(pool, source, writer, ray.put(writer), options, progress or NullBar())
        dispatch.todo.extend(zip(units.tolist(), starts.tolist(), strict=True))
        finished = False
        try:
            with interruptible(sidecar):
                processed = dispatch.run()
            finished = True
        finally:
            with interruptible(sidecar, defer=True):  # a second Ctrl-C must not cut the actors' pieces short
                pool.stop(now=not finished)
        return processed

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():  # a caller's own Ray (a notebook, the tests): used, left running
            return
        address = self.config.ray_address
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"--ray-address {address}" if address else "--engine ray"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{where}: cannot connect to Ray: {first}") from None
        self.started_ray = True


def probe(address: str, flag: str) -> None:
    """Fails fast (CONNECT_TIMEOUT) when nothing listens at a HOST:PORT or ray://HOST:PORT address; Ray's own
    connection would retry for minutes."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(
            f"{flag} {address}: use auto, HOST:PORT (the head's `ray start --head` port) or ray://HOST:PORT"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise UserError(
            f"{flag} {address}: cannot reach {host}:{port} ({why}); is the Ray head running there?"
        ) from None


def check_shared_paths(config: Any) -> None:
    """On a cluster every node opens the inputs, writes the sidecar and loads the model: a relative path would name
    another folder on each node, so it is refused (`--model`/`--base` only when they name a local folder here: a
    Hub id looks relative too)."""
    named = [("--out", config.out), *(("input", name) for name in config.inputs)]
    named += [("--from", config.from_file), ("--root", config.root)]
    for flag, model in (("--model", config.model.model), ("--base", config.model.base)):
        if model is not None and os.path.exists(model):
            named.append((flag, model))
    for flag, value in named:
        if value is not None and not os.path.isabs(os.fspath(value)):
            raise UserError(
                f"{flag} {value}: a relative path; with --engine ray on a cluster every node opens it, so give an "
                "absolute path on storage every node mounts (e.g. /data/...)"
            )


@dataclass
class RemoteScorer:
    """What the driver's plan reads from a scorer, as the first actor loaded it; `pool` scores."""

    metadata: dict[str, str]
    level_names: list[str]
    has_regressor: bool
    reasoning: bool  # a reasoning model (its rows gain score_soft, --keep-reasoning applies)
    video_metadata: dict[str, str]  # the video prompt and its ids, for outputs that may hold videos
    device: Any
    pool: ActorPool


@dataclass
class Member:
    """One actor and what the driver knows of it."""

    actor: Any
    node: str | None  # known at creation for CPU actors (one per node), after loading for GPU ones
    loading: Any = None  # the ref of `load()` until it answers
    starting: Any = None  # the ref of `start()` until it answers
    waiting: Any = None  # the ref of the pending `finished()` while it runs
    workers: int = 1
    size: int = 1
    units: dict[int, int] = field(default_factory=dict)  # unit -> start row, handed out and not reported


class ActorPool:
    """The run's actors: one per GPU (`--gpus-per-actor` each) when the device is a GPU, else one per node."""

    def __init__(self, build: Build, config: Any):
        import ray

        self.build, self.config = build, config
        self.members: list[Member] = []
        self.info: dict[str, Any] | None = None  # the first loaded actor's `load()` answer
        self.losses = 0  # actors lost before any loaded the model
        gpus = ray.cluster_resources().get("GPU", 0)
        if config.device == "cuda" and not gpus:
            raise UserError("--device cuda: the Ray cluster has no GPU (use --device auto or cpu)")
        self.gpu = config.device != "cpu" and gpus > 0
        self.gpus_per_actor = float(config.gpus_per_actor)
        self.threads = os.environ.get("OMP_NUM_THREADS")
        self.last_grow = 0.0
        self.grow()
        if not self.members:
            what = f"{self.gpus_per_actor:g} GPU" if self.gpu else "a CPU"
            raise UserError(f"--engine ray: no node of the Ray cluster has {what} for an actor")

    def grow(self) -> None:
        """Starts actors where the cluster has room: new nodes, or replacements for lost actors."""
        import ray

        self.last_grow = time.monotonic()
        alive = [n for n in ray.nodes() if n["Alive"]]
        if self.gpu:
            wanted = int(sum(n["Resources"].get("GPU", 0) for n in alive) / self.gpus_per_actor + 1e-9)
            for _ in range(wanted - len(self.members)):
                self._add(None)
            return
        taken = {m.node for m in self.members}
        for node in alive:
            if node["Resources"].get("CPU", 0) >= 1 and node["NodeID"] not in taken:
                self._add(node["NodeID"])

    def _add(self, node: str | None) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from iqa_cli.engines.ray_worker import UnitActor

        options: dict[str, Any] = {"num_cpus": 1, "max_restarts": 0, "max_concurrency": 4}
        if self.gpu:
            options["num_gpus"] = self.gpus_per_actor
        if node is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        actor = ray.remote(UnitActor).options(**options).remote(self.build, self.gpu, os.getcwd(), self.threads)
        self.members.append(Member(actor, node, loading=actor.load.remote()))

    def first(self) -> RemoteScorer:
        """Waits for the first actor to load the model (the others go on loading)."""
        import ray
        import torch

        while self.info is None:
            loading = {m.loading: m for m in self.members if m.loading is not None}
            if not loading:
                self.grow()
                time.sleep(POLL_SECONDS)
                continue
            ready, _ = ray.wait(list(loading), num_returns=1, timeout=GROW_SECONDS)
            for ref in ready:
                self.loaded(loading[ref])
            if time.monotonic() - self.last_grow > GROW_SECONDS:
                self.grow()
        info = self.info
        device = torch.device("cuda" if self.gpu else "cpu")
        return RemoteScorer(
            info["metadata"],
            info["level_names"],
            info["has_regressor"],
            info["reasoning"],
            info["video_metadata"],
            device,
            self,
        )

    def loaded(self, member: Member) -> bool:
        """Reads a `load()` answer: True when the actor has the model, False when it was lost."""
        try:
            info = answer(member.loading)
        except LostActor as exc:
            self.lose(member)
            self.losses += 1
            if self.info is None and self.losses >= MAX_LOSSES:
                raise UserError(
                    f"--engine ray: {self.losses} actors were lost while loading the model ({exc})"
                ) from None
            return False
        member.loading = None
        member.node = info["node"]
        if self.info is None:
            self.info = info
        elif info["metadata"] != self.info["metadata"]:
            differs = sorted(k for k in set(info["metadata"]) | set(self.info["metadata"])
                             if info["metadata"].get(k) != self.info["metadata"].get(k))  # fmt: skip
            key = differs[0]
            raise UserError(
                f"--engine ray: an actor on node {member.node} loaded the model with {key}="
                f"{info['metadata'].get(key)!r}, the run's first one with {self.info['metadata'].get(key)!r} (GPUs "
                "of two kinds?); pass --dtype to fix it"
            )
        return True

    def local_world_size(self, member: Member) -> int:
        """Actors of this run on the member's node: how many share its cores."""
        import ray

        if not self.gpu:
            return 1
        gpus = next((n["Resources"].get("GPU", 0) for n in ray.nodes() if n["NodeID"] == member.node), 1)
        return max(1, int(gpus / self.gpus_per_actor + 1e-9))

    def lose(self, member: Member) -> None:
        """Drops an actor (killed, in case it only seemed lost); the next round replaces it where there is room."""
        import ray

        if member in self.members:
            self.members.remove(member)
        self.last_grow = 0.0
        with contextlib.suppress(Exception):  # already gone
            ray.kill(member.actor, no_restart=True)

    def stop(self, now: bool) -> None:
        """Ends the actors' loops: the rows of unfinished units are written as pieces (`now`: the run was
        stopped, so units not started are dropped and each loop ends at its next batch)."""
        import ray

        running = [m for m in self.members if m.loading is None and m.starting is None and m.waiting is not None]
        if running:
            with contextlib.suppress(Exception):  # an actor already lost: its pieces are what it wrote
                ray.wait([m.actor.stop.remote(20.0, now) for m in running], num_returns=len(running), timeout=30)

    def close(self) -> None:
        """The actors go (their GPUs free for the next job)."""
        for member in list(self.members):
            self.lose(member)


class LostActor(Exception):
    """An actor died, its node was lost, or Ray cannot place it."""


def answer(ref: Any) -> Any:
    """`ray.get(ref)`; an error raised inside the actor is raised here as itself (a UserError stays one line)."""
    import ray
    from ray.exceptions import ActorUnschedulableError, RayActorError, RayTaskError

    try:
        return ray.get(ref)
    except (RayActorError, ActorUnschedulableError) as exc:
        if getattr(exc, "actor_init_failed", False):  # not a lost node: this node cannot run the actor at all
            last = [line.strip() for line in str(exc).splitlines() if line.strip()][-1]
            raise UserError(
                f"--engine ray: an actor could not start ({last}); every node needs this iqa-cli, with its ray "
                "extra, in the Python that runs Ray"
            ) from None
        raise LostActor(" ".join(str(exc).split())[:300]) from None
    except RayTaskError as exc:
        from iqa_cli.engines.ray_worker import DecoderLost

        cause = exc.cause
        if isinstance(cause, DecoderLost):
            raise LostActor(f"a decoding worker died: {cause}") from None
        if isinstance(cause, UserError | KeyboardInterrupt):
            raise cause from None
        raise exc.as_instanceof_cause() from None


class Dispatch:
    """The driver's loop: hands units to the actors, counts what they finish, puts back what lost actors held."""

    def __init__(self, pool: ActorPool, source: Any, writer: Any, writer_ref: Any, options: dict, progress: Any):
        self.pool, self.source, self.writer, self.writer_ref = pool, source, writer, writer_ref
        self.options, self.progress = options, progress
        self.todo: collections.deque[tuple[int, int]] = collections.deque()
        self.losses: collections.Counter[int] = collections.Counter()
        self.processed = 0

    def run(self) -> int:
        import ray

        pool = self.pool
        while self.todo or any(m.units for m in pool.members):
            if time.monotonic() - pool.last_grow > GROW_SECONDS:
                pool.grow()
            pending: dict[Any, Member] = {}
            for member in pool.members:
                if member.loading is None and member.starting is None and member.waiting is None:
                    self.start(member)  # loaded (the first one, by the plan) but not started yet
                if member.waiting is not None:
                    self.hand_out(member)
                ref = member.loading or member.starting or member.waiting
                if ref is not None:
                    pending[ref] = member
            if not pending:
                time.sleep(POLL_SECONDS)
                continue
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=GROW_SECONDS)
            for ref in ready:
                self.answered(pending[ref])
        return self.processed

    def answered(self, member: Member) -> None:
        pool = self.pool
        try:
            if member.loading is not None:
                if pool.loaded(member):
                    self.start(member)
            elif member.starting is not None:
                started = answer(member.starting)
                member.starting, member.workers, member.size = None, max(1, started["workers"]), started["size"]
                member.waiting = member.actor.finished.remote(POLL_SECONDS)
            else:
                for u, rows in answer(member.waiting):
                    member.units.pop(u, None)
                    self.done(rows)
                member.waiting = member.actor.finished.remote(POLL_SECONDS)
        except LostActor as exc:
            pool.lose(member)
            self.requeue(member, str(exc))

    def start(self, member: Member) -> None:
        lws = self.pool.local_world_size(member)
        member.starting = member.actor.start.remote(self.writer_ref, local_world_size=lws, **self.options)

    def hand_out(self, member: Member) -> None:
        """Keeps an actor one unit ahead of its decoding workers, and with rows for a few calls in hand (small
        units), so no worker waits for the driver."""
        given = []
        while self.todo:
            rows = [self.source.rows(u) - s if self.source.rows(u) >= 0 else None for u, s in member.units.items()]
            enough_rows = any(r is None for r in rows) or sum(rows) >= 4 * member.workers * member.size
            if len(member.units) > member.workers and enough_rows:
                break
            u, start = self.todo.popleft()
            member.units[u] = start
            given.append((u, start))
        if given:
            member.actor.give.remote(given)

    def requeue(self, member: Member, reason: str) -> None:
        """The units a lost actor held go back to the front of the queue, each from the end of its pieces."""
        if not member.units:
            return
        state = self.writer.sidecar.scan(len(self.source), clean=False)
        finished = set(state.finished.tolist())
        self.losses.update(list(member.units))  # one loss each (a dict would add its values)
        hit = [u for u in sorted(member.units) if self.losses[u] >= MAX_LOSSES and u not in finished]
        if hit:  # which of the units an actor held killed it is not known: each is named
            names = "; ".join(self.source.label(u) for u in hit[:3]) + ("; ..." if len(hit) > 3 else "")
            what = "it" if len(hit) == 1 else f"these {len(hit)} units together"
            lost = self.losses[hit[0]]
            raise UserError(f"{names}: {lost} Ray actors were lost while scoring {what} (last: {reason})")
        for u, start in sorted(member.units.items(), reverse=True):
            if u in finished:  # written before the actor went, not reported
                self.done(self.written_rows(u) - start)
                continue
            resumed = state.starts.get(u, 0)
            self.done(resumed - start)
            self.todo.appendleft((u, resumed))

    def written_rows(self, u: int) -> int:
        import pyarrow.parquet as pq

        path = self.writer.sidecar.unit(u)
        if not path.exists() and self.writer.directory is not None:
            path = Path(self.writer.directory) / f"{self.source.output_stem(u)}.parquet"
        try:
            return pq.read_metadata(path).num_rows
        except Exception:
            return 0

    def done(self, rows: int) -> None:
        if rows > 0:
            self.processed += rows
            self.progress.advance(rows)


class RayScorer:
    """`iqa score`'s values in a Ray Data pipeline: a callable class for `Dataset.map_batches`.

        ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)
        ds = ds.map_batches(RayScorer, fn_constructor_kwargs=dict(model="zhiyuanyou/DeQA-Score-Mix3",
                            image_column="bytes"), batch_size=64, num_gpus=1,
                            compute=ray.data.ActorPoolStrategy(size=8))

    Each batch (a dict of numpy arrays, or a pyarrow table or pandas frame) comes back as an Arrow table: its
    columns plus score, std, probs, level, width, height, error (and score_reg for Q-Scorer models, score_soft for
    reasoning models), the values `iqa score` writes; an undecodable image, or a reasoning model's answer without
    a number, is a row with `error` set and null scores.

    Args:
        model: a Hub repo id, a checkpoint folder or an `iqa train` run.
        image_column: the column holding the images: encoded bytes, paths, or `{bytes, path}` structs.
        device, dtype, batch_size, fast_decode, options: `iqa_cli.engines.columns.ColumnScorer`'s.
    """

    def __init__(self, model: str, *, image_column: str = "bytes", **options: Any):
        from iqa_cli.engines.columns import ColumnScorer

        self.image_column = image_column
        self.scorer = ColumnScorer(model, **options)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa
        from ray.data.block import BlockAccessor

        table = batch if isinstance(batch, pa.Table) else BlockAccessor.batch_to_block(batch)
        if self.image_column not in table.column_names:
            raise UserError(f"image_column {self.image_column!r}: the batch has columns {table.column_names}")
        self.scorer.check_columns(table.column_names)
        scores = self.scorer.score(table.column(self.image_column).to_pylist())
        for name in scores.column_names:
            table = table.append_column(scores.schema.field(name), scores.column(name))
        return table
