"""The FastAPI app of one worker process: one model on one device, its batcher, the routes.

Routes: `POST /score` (JSON), `POST /` (Flow-GRPO's pickle protocol), `GET /health`, `GET /metrics`. Every
refusal is a 4xx/5xx with a one-line JSON `{"error": ...}`; nothing reads server-side paths or fetches URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from iqa_cli.errors import speak_flags
from iqa_cli.serving.batcher import Batcher, OutOfMemory, Overloaded
from iqa_cli.serving.config import ServeConfig
from iqa_cli.serving.metrics import Metrics, forget_dead_processes
from iqa_cli.serving.requests import (
    BadRequest,
    ScoreRequest,
    decode_image,
    decode_video,
    is_video,
    parse_json,
    parse_pickle,
)

STARTUP_FAILURE = 3  # uvicorn's exit code for a worker that could not start: its supervisor stops then
SCORE_RANGE = (1, 5)  # level centers span [1, 5] (docs/METHOD.md, "Levels")
REWARD_SCALE = 5.0  # reward-server's `compute_deqascore` answers score / 5; `POST /` does the same
RETRY_AFTER_S = "1"
ROUTES = ("/score", "/", "/health", "/metrics")
OPEN_ROUTES = ("/health",)  # answered without the token (load balancers' probes)


def error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(reason).split())}, status_code=status, headers=headers)


def warm_up_image() -> Any:
    """The image of the warm-up calls: mid-grey, the 448 px square the released models read."""
    from PIL import Image

    return Image.new("RGB", (448, 448), (128, 128, 128))


def claim_device(config: ServeConfig) -> tuple[str, Any]:
    """The first device no live worker holds: a `run_lock` per device, held for the worker's life (the kernel frees
    a dead worker's, so its replacement takes the same device)."""
    from iqa_cli.run_lock import RunLock

    if len(config.devices) == 1 and not config.lock_dir:
        return config.devices[0], None
    for index, device in enumerate(config.devices):
        lock = RunLock(Path(config.lock_dir) / f"device-{index}.lock", f"iqa serve worker on {device}")
        if lock.try_acquire() is None:
            return device, lock
    raise RuntimeError(f"every device of {config.devices} is held by another worker")


@dataclass
class Entry:
    """One request entry ready for the batcher: its model inputs (None: `reason` says why it has none) and, for a
    video, what the answer says about it."""

    visual: Any = None
    reason: str | None = None
    video: bool = False  # its bytes are a video
    frames: int = 0  # a decoded video's sampled frames (its model call holds videos of this count only)
    duration: float | None = None  # seconds
    fps: float | None = None  # the video's average frame rate


class Worker:
    """What one worker process holds: its device, scorer, batcher and counters."""

    def __init__(self, config: ServeConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.device = ""
        self.scorer: Any = None
        self.batcher: Batcher | None = None
        self.video_decoder: Any = None  # `iqa score`'s Decoder: the sampling, the family's video transform
        self.in_flight = 0
        self.draining = False
        self._lock_handle = None

    def start(self) -> None:
        import torch

        from iqa_cli.images import load_image
        from iqa_cli.scoring.loader import Decoder
        from iqa_cli.scoring.scorer import Scorer

        _exit_with_parent()
        self.device, self._lock_handle = claim_device(self.config)
        forget_dead_processes()
        # On the CPU several intra-op threads split a GEMM's rows between them, so a row's rounding would depend
        # on its position in the batch (1 ulp, measured); one thread keeps a score independent of its neighbours.
        threads = 1 if self.device == "cpu" else None
        if threads is not None:
            torch.set_num_threads(threads)
        c = self.config
        self.scorer = Scorer.from_pretrained(
            c.model.model,
            device=self.device,
            task=c.task,
            **c.model.load_kwargs(),
        )
        video_transform = getattr(self.scorer, "video_transform", None)  # None: the family scores no videos
        self.video_decoder = Decoder(self.scorer.transform, load_image, video_transform, c.sampling())
        self.batcher = Batcher(
            self.scorer,
            max_batch=c.max_batch,
            max_wait_s=c.max_wait_ms / 1000,
            queue_limit=c.queue_limit,
            on_batch=self.metrics.observe_batch,
            threads=threads,
            call_sizes=c.call_sizes,
        )
        self.batcher.warm_up(self.scorer.transform(warm_up_image()))
        self.batcher.start()
        print(f"iqa serve: worker {os.getpid()} ready on {self.device}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop(timeout=self.config.timeout)

    def prepare(self, request: ScoreRequest) -> list[Entry]:
        """Decodes and transforms every image and video (in a thread); failures become per-entry reasons, as
        `iqa score`'s error rows (an image that decodes but that the model's preprocessing refuses, e.g. a Qwen-VL
        model's aspect ratio over 200, too; a broken video; a video for a family that scores none)."""
        from iqa_cli.scoring.loader import reason

        entries = []
        for i, data in enumerate(request.images):
            if is_video(data):
                row = decode_video(data, self.video_decoder)
                if row.visual is None:
                    entries.append(Entry(reason=f"images[{i}]: {row.error}", video=True))
                else:
                    entries.append(Entry(row.visual, None, True, row.frames, _finite(row.duration), _finite(row.fps)))
                continue
            try:
                entries.append(Entry(self.scorer.transform(decode_image(data, self.config.image_pixel_limit))))
            except Exception as err:
                entries.append(Entry(reason=f"images[{i}]: {reason(err)}"))
        return entries


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """The app of one worker; uvicorn calls it with no argument and the config comes from the environment."""
    if config is None:  # a worker process of `iqa serve`: errors name its flags
        speak_flags()
        config = ServeConfig.from_env()
    metrics = Metrics()
    worker = Worker(config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await run_in_threadpool(worker.start)
        except Exception as err:  # one line, not uvicorn's traceback; the supervisor then stops the server
            print(f"error: worker on {worker.device or config.devices}: {' '.join(str(err).split())}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(STARTUP_FAILURE)
        _drain_on_signals(worker)
        yield
        await run_in_threadpool(worker.stop)

    app = FastAPI(title="iqa serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    @app.middleware("http")
    async def guard(request: Request, call_next):
        response = await _guarded(request, call_next)
        route = request.url.path if request.url.path in ROUTES else "other"  # bounded label values
        metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    async def _guarded(request: Request, call_next):
        route = request.url.path
        if config.token is not None and route not in OPEN_ROUTES:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.token}".encode()):
                reason = "wrong token" if given else "missing token: send Authorization: Bearer <token>"
                return error(401, reason, {"WWW-Authenticate": "Bearer"})
        if worker.draining and route not in OPEN_ROUTES:
            return error(503, "server is shutting down", {"Retry-After": RETRY_AFTER_S, "Connection": "close"})
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error(400, "invalid request")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        return {
            "status": "draining" if worker.draining else "ok",
            "model": worker.scorer.metadata.get("model", config.model.model) if worker.scorer else config.model.model,
            "devices": config.devices,
            "device": worker.device,
            "pid": os.getpid(),
            "queue": worker.batcher.pending if worker.batcher else 0,
            "in_flight": worker.in_flight,
            "max_batch": config.max_batch,
            "video_sampling": config.sampling().describe(),
        }

    @app.get("/metrics")
    async def metrics_route():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def handle(request: Request, route: str, parse, answer):
        start = time.perf_counter()
        worker.in_flight += 1
        try:
            response = await _score(request, route, parse, answer)
        finally:
            worker.in_flight -= 1
        metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    async def _score(request: Request, route: str, parse, answer):
        deadline = time.monotonic() + config.timeout
        try:
            body = await _read_body(request, config.max_body_bytes)
            parsed = parse(body, config.max_images)
        except BadRequest as err:
            return error(err.status, err.reason)
        metrics.images.labels(route).inc(len(parsed.images))
        entries = await run_in_threadpool(worker.prepare, parsed)  # its time counts against the deadline too
        reasons = [e.reason for e in entries]
        metrics.image_errors.inc(sum(r is not None for r in reasons))
        good = [e for e in entries if e.visual is not None]
        if reasons and not good:
            return error(422, f"no image could be scored: {reasons[0]}")
        metrics.queue.inc(len(good))
        try:
            scoring = worker.batcher.score([e.visual for e in good], [e.frames for e in good])
            rows = await asyncio.wait_for(scoring, timeout=max(deadline - time.monotonic(), 0.001))
        except Overloaded as err:
            return error(503, f"overloaded: {err}; retry later", {"Retry-After": RETRY_AFTER_S})
        except OutOfMemory as err:
            return error(503, f"{err}; retry later, or restart the server with a smaller --max-batch",
                         {"Retry-After": RETRY_AFTER_S})  # fmt: skip
        except asyncio.TimeoutError:
            return error(504, f"not scored within --timeout {config.timeout:g} s")
        finally:
            metrics.queue.dec(len(good))
        it = iter(rows)
        results = [next(it) if e.visual is not None else None for e in entries]
        for i, row in enumerate(results):  # a reasoning model's answer without a number: a failure with its text
            if row is not None and row.error is not None:
                results[i], reasons[i] = None, f"images[{i}]: {row.error}"
                metrics.image_errors.inc()
        return answer(parsed, results, reasons, entries)

    def answer_json(parsed: ScoreRequest, results, reasons, entries: list[Entry]) -> JSONResponse:
        scorer = worker.scorer
        out: dict[str, Any] = {
            "model": scorer.metadata.get("model", config.model.model),
            "range": list(SCORE_RANGE),
            "levels": scorer.level_names,
            "scores": [r.score if r else None for r in results],
            "std": [r.std if r else None for r in results],
        }
        if scorer.has_regressor:
            out["scores_reg"] = [r.score_reg if r else None for r in results]
        if parsed.probs:
            out["probs"] = [r.probs if r else None for r in results]
        if any(e.video for e in entries):  # a scored video's facts; null for images and failed entries
            for name in ("frames", "duration", "fps"):
                out[name] = [getattr(e, name) if r and e.video else None for e, r in zip(entries, results, strict=True)]
        out["errors"] = reasons
        return JSONResponse(out)

    def answer_pickle(parsed: ScoreRequest, results, reasons, entries: list[Entry]) -> Response:
        failed = [r for r in reasons if r is not None]
        if failed:  # the protocol has no slot for a failed image, and a made-up reward would poison training
            return error(422, f"{len(failed)} of {len(reasons)} images could not be scored; first: {failed[0]}")
        body = pickle.dumps({"outputs": [r.score / REWARD_SCALE for r in results]})
        return Response(body, media_type="application/octet-stream")

    @app.post("/score")
    async def score_json(request: Request):
        return await handle(request, "/score", parse_json, answer_json)

    @app.post("/")
    async def score_pickle(request: Request):
        return await handle(request, "/", parse_pickle, answer_pickle)

    return app


def _finite(value: float) -> float | None:
    """JSON has no NaN: an unknown number is null."""
    return value if math.isfinite(value) else None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    too_big = f"request body over the limit of {limit} bytes (--max-body-mb)"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


def _exit_with_parent() -> None:
    """Linux: SIGTERM this worker when its supervisor dies, even by SIGKILL, so no orphan keeps the device."""
    if sys.platform != "linux":
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _drain_on_signals(worker: Worker) -> None:
    """Marks the worker draining on SIGTERM/SIGINT, then hands the signal to uvicorn's own handler, which stops
    accepting connections and lets in-flight requests finish before the app shuts down."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            worker.draining = True
            if callable(previous):
                previous(signum, frame)

        with contextlib.suppress(ValueError):  # not the main thread (an app mounted in a test client)
            signal.signal(sig, handler)
