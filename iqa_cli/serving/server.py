"""`serve`: one uvicorn worker process per device under uvicorn's own supervisor.

Why FastAPI + uvicorn and not LitServe (0.2.19, read before choosing): LitServe parses every request body as
JSON or a form in its HTTP process, so the reward-server protocol (a raw pickle at `POST /`) would need its
internals bypassed, and each of its routes (`LitAPI`) gets its own inference workers, so two routes would load
two copies of the model per device; it has no bounded queue either. uvicorn's supervisor (`workers=N`) already
spawns, health-checks and restarts worker processes and forwards SIGTERM to them for a graceful drain; each
worker claims one device (a lock file per device) and holds one model, and FastAPI gives routes, raw bodies and
error handlers. Dynamic batching (`batcher.py`) and the limits are ours, a few dozen lines each.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from iqa_cli.errors import UserError
from iqa_cli.models import hub
from iqa_cli.serving.config import CONFIG_ENV, ServeConfig

APP = "iqa_cli.serving.app:create_app"
DRAIN_MARGIN_S = 5.0  # uvicorn's graceful-shutdown wait: the request timeout plus this


class ServeError(Exception):
    """The server stopped because a worker could not start (its own message is on stderr above)."""

    exit_code = 1


def check_model(config: ServeConfig) -> None:
    """What can be known about the model options without loading weights (a UserError naming the problem)."""
    from iqa_cli.models.backbone import family_of, family_options, get_family, supported_families

    spec = config.model
    if spec.base is not None:
        hub.locate(spec.base, what="base model")  # a missing folder, an unknown repo, no network: one line, at once
    model_type, source = family_of(spec.model, base=spec.base, revision=spec.revision)
    if model_type not in supported_families():
        get_family(model_type, source)  # its one-line error
    if spec.quantize is not None:
        check_quantize(config)
    if spec.prompt is None and not spec.family:
        return  # the family module (and torch) is imported by the workers only
    family = get_family(model_type, source)
    family_options(family, spec.family)
    if spec.prompt is not None and spec.prompt.count(family.image_token) != 1:
        raise UserError(f"--prompt must hold {family.image_token} exactly once: {spec.prompt!r}")


def check_quantize(config: ServeConfig) -> None:
    """`--quantize` against each device and the dtype it would run in (int4: CUDA and bfloat16 only), as
    `Scorer.from_pretrained` checks it, but here, before any worker starts."""
    import torch

    from iqa_cli.scoring import quantize
    from iqa_cli.scoring.scorer import resolve_dtype

    for name in config.devices:
        device = torch.device(name)
        quantize.check(config.model.quantize, device, resolve_dtype(config.model.dtype_name, device))


def check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None


def supervisor_class() -> type:
    """uvicorn's supervisor, with every stop signal a graceful stop and the workers leaving them to it.

    SIGHUP stops the server as SIGTERM does (uvicorn restarts its workers on it; a closed terminal or ssh session
    sends it to the whole group), unless it was ignored at start (`nohup iqa serve`). Workers start with SIGINT
    and SIGHUP blocked: a Ctrl-C or hangup of the whole group reaches the supervisor only, which stops each worker
    with SIGTERM, its graceful drain (in-flight requests finish). A SIGTERM to the whole group drains them too.
    """
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        def __init__(self, *args, **kwargs):
            nohup = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            super().__init__(*args, **kwargs)
            if nohup:
                signal.signal(signal.SIGHUP, signal.SIG_IGN)

        def handle_hup(self) -> None:
            self.handle_term()

        def init_processes(self) -> None:
            with _blocked_in_children():
                super().init_processes()

        def keep_subprocess_alive(self) -> None:  # restarts a worker that died
            with _blocked_in_children():
                super().keep_subprocess_alive()

    return Supervisor


@contextlib.contextmanager
def _blocked_in_children() -> Iterator[None]:
    """SIGINT and SIGHUP blocked while workers are started: they inherit the mask through exec and keep it, so
    those signals stay with the supervisor. Here a signal arriving meanwhile waits, and is handled on unblocking."""
    from multiprocessing import resource_tracker

    stops = {signal.SIGINT, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        # multiprocessing's resource tracker process, started with the first worker, keeps SIGHUP blocked too; its
        # start unblocks SIGINT here, so it starts first and SIGINT is blocked again after it
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def serve(config: ServeConfig, say: Callable[[str], None] = print) -> None:
    """Checks the options, then serves until SIGTERM/SIGINT/SIGHUP (in-flight requests finish first)."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    config.check()
    check_model(config)
    check_port(config.host, config.port)
    if not config.loopback and config.token is None:
        say(
            f"warning: listening on {config.host} without --token: anyone who can reach this address can use "
            f"the {'GPUs' if config.devices != ['cpu'] else 'CPU'} of this machine"
        )
    work = Path(tempfile.mkdtemp(prefix="iqa-serve-"))
    metrics_dir = work / "prometheus"
    metrics_dir.mkdir()
    config.lock_dir = str(work)
    os.environ[CONFIG_ENV] = config.to_env()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # read by prometheus_client in each worker
    server_config = uvicorn.Config(
        APP,
        factory=True,
        host=config.host,
        port=config.port,
        workers=len(config.devices),
        timeout_graceful_shutdown=int(config.timeout + DRAIN_MARGIN_S),
        log_level="warning",
        access_log=False,
    )
    supervisor = None
    try:
        sock = server_config.bind_socket()
        say(
            f"iqa serve: http://{config.host}:{config.port} model {config.model.model} on {', '.join(config.devices)}, "
            f"max batch {config.max_batch}, max wait {config.max_wait_ms:g} ms"
        )
        supervisor = supervisor_class()(server_config, sockets=[sock])
        supervisor.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if supervisor is not None and any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        raise ServeError("a worker could not start (its reason is above); the server stopped")
    sys.stderr.flush()
