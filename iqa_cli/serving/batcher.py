"""Dynamic batching: images from concurrent requests share fixed-shape model calls.

One thread per worker runs the model. It takes the first waiting image, then waits up to `max_wait` for more,
up to `max_batch`, and scores them in ONE call of exactly `max_batch` rows (the collate pads the rest). Every
call having the same number of rows is what makes a score independent of which requests shared its batch: for
mPLUG-Owl2 every call has one shape and a row's arithmetic is the same whatever the other rows hold
(tests/test_serve.py checks it bit for bit). The transformers families pad each call's sequence to its longest
image, so the shape follows the batch-mates and a score agrees within 1e-5 rather than bit for bit
(tests/test_hf_vlm_serve.py; 0.0 measured on the tiny Qwen2-VL). The queue is bounded; a request that would
overflow it is refused at once (HTTP 503), not queued without end.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch


class Overloaded(Exception):
    """The queue cannot take this request's images now."""


@dataclass
class Row:
    """One image's result."""

    score: float
    std: float
    probs: list[float]
    score_reg: float | None = None


@dataclass
class _Item:
    visual: Any  # the backbone's transform of one image
    future: Future


class Batcher:
    def __init__(
        self, scorer: Any, *, max_batch: int, max_wait_s: float, queue_limit: int, on_batch=None, threads=None
    ):
        self.scorer = scorer
        self.threads = threads  # torch intra-op threads of the model thread (None: torch's default)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_limit = queue_limit
        self.on_batch = on_batch  # called with (images in the call, seconds) after each model call
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._pending = 0  # images accepted and not answered yet
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="iqa-batcher", daemon=True)

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finishes what is queued, then ends the thread."""
        self._stop.set()
        self._thread.join(timeout)

    async def score(self, visuals: list[Any]) -> list[Row]:
        """Queues one request's transformed images; their rows, in order. Raises Overloaded when full."""
        with self._lock:
            if self._pending + len(visuals) > self.queue_limit:
                raise Overloaded(f"{self._pending} images are waiting (limit {self.queue_limit})")
            self._pending += len(visuals)
        futures = []
        for visual in visuals:
            future: Future = Future()
            futures.append(future)
            self._queue.put(_Item(visual, future))
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    def _release(self, count: int) -> None:
        with self._lock:
            self._pending -= count

    def _take(self) -> list[_Item]:
        try:
            first = self._queue.get(timeout=0.05)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]  # timed-out ones drop out
        self._release(len(batch) - len(live))
        return live

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # in this thread: OpenMP's thread count is per calling thread
        while not (self._stop.is_set() and self._queue.empty()):
            batch = self._take()
            if not batch:
                continue
            start = time.perf_counter()
            try:
                rows = self._score(batch)
            except Exception as err:  # a failed call fails its requests, never the worker
                self._release(len(batch))
                for item in batch:
                    item.future.set_exception(err)
                continue
            if self.on_batch is not None:  # before the answers, so a client that reads /metrics next sees it
                self.on_batch(len(batch), time.perf_counter() - start)
            self._release(len(batch))
            for item, row in zip(batch, rows, strict=True):
                item.future.set_result(row)

    def _score(self, batch: list[_Item]) -> list[Row]:
        visual = self.scorer.collate([item.visual for item in batch], self.max_batch, torch.float32)
        out = self.scorer.score_batch(visual)
        rows = []
        for i in range(len(batch)):
            reg = float(out.score_reg[i]) if out.score_reg is not None else None
            rows.append(Row(float(out.score[i]), float(out.std[i]), out.probs[i].tolist(), reg))
        return rows
