"""Dynamic batching: images from concurrent requests share fixed-shape model calls.

One thread per worker runs the model. It takes the first waiting image, then waits up to `max_wait` for more,
up to `max_batch`, and scores them in ONE call of exactly `max_batch` rows (the collate pads the rest). Every
call having the same number of rows is what makes a score independent of which requests shared its batch: for
mPLUG-Owl2 every call has one shape and a row's arithmetic is the same whatever the other rows hold
(tests/test_serve.py checks it bit for bit). The transformers families pad each call's sequence to its longest
image, so the shape follows the batch-mates and a score agrees within 1e-5 rather than bit for bit
(tests/test_hf_vlm_serve.py; 0.0 measured on the tiny Qwen2-VL). The queue is bounded; a request that would
overflow it is refused at once (HTTP 503), not queued without end.

`call_sizes` (e.g. 8, 16, 32, 64) trades some of that for latency: a call takes the smallest size that holds its
images, so a lone image pays an 8-row forward, not a 64-row one. Each size is one fixed shape, batch-invariant
on its own; the same image scored in calls of two sizes may differ in the last bits (other kernels). Before
serving, `warm_up` runs one full call of every size: the first request does not pay kernel selection, and a
`--max-batch` that does not fit in memory stops the worker at start with one line. A call that runs out of
memory later (a larger image) fails its requests with `OutOfMemory` (HTTP 503), never the worker.

Videos wait in the same queue and are scored in calls of their own, as `iqa score` scores them: every video of a
call has the same frame count F and the call has max(1, size // F) rows of F frames (size: the smallest call size
whose rows hold the waiting videos), so its shape depends on F alone and a video's score does not depend on its
batch-mates either. A call takes the kind of the oldest waiting item (images, or videos of its F); items of
other kinds that arrive meanwhile wait, in order, for the next calls.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from iqa_cli.scoring.loader import videos_per_call
from iqa_cli.scoring.runner import free_cuda_memory


class Overloaded(Exception):
    """The queue cannot take this request's images now."""


class OutOfMemory(Exception):
    """A model call did not fit in the device's memory (its memory is freed again)."""


@dataclass
class Row:
    """One image's result."""

    score: float
    std: float | None  # None: a reasoning model's answer without a digit readout
    probs: list[float] | None
    score_reg: float | None = None
    error: str | None = None  # a reasoning model's answer gave no number (score NaN): the generated text


@dataclass
class _Item:
    visual: Any  # the backbone's transform of one image, or its video transform of one video
    future: Future
    frames: int = 0  # a video's sampled frame count (its call holds videos of this count only); 0: an image


class Batcher:
    def __init__(
        self,
        scorer: Any,
        *,
        max_batch: int,
        max_wait_s: float,
        queue_limit: int,
        on_batch=None,
        threads=None,
        call_sizes: tuple[int, ...] | list[int] | None = None,
    ):
        self.scorer = scorer
        self.threads = threads  # torch intra-op threads of the model thread (None: torch's default)
        self.max_batch = max_batch
        self.call_sizes = tuple(sorted({*(call_sizes or ()), max_batch}))  # rows a model call may have
        self.max_wait_s = max_wait_s
        self.queue_limit = queue_limit
        self.on_batch = on_batch  # called with (images in the call, seconds) after each model call
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._waiting: collections.deque[_Item] = collections.deque()  # taken from the queue, not of the last call
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

    async def score(self, visuals: list[Any], frames: list[int] | None = None) -> list[Row]:
        """Queues one request's transformed images and videos (`frames`: each one's frame count, 0 for an image;
        None: all images); their rows, in order. Raises Overloaded when full (a video counts as one entry)."""
        with self._lock:
            if self._pending + len(visuals) > self.queue_limit:
                raise Overloaded(f"{self._pending} images are waiting (limit {self.queue_limit})")
            self._pending += len(visuals)
        futures = []
        for visual, count in zip(visuals, frames or [0] * len(visuals), strict=True):
            future: Future = Future()
            futures.append(future)
            self._queue.put(_Item(visual, future, count))
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    def _release(self, count: int) -> None:
        with self._lock:
            self._pending -= count

    def _take(self) -> list[_Item]:
        """The next call's items: the oldest waiting item and, up to a call's capacity, the later ones of its kind
        (images, or videos of its frame count), waiting up to `max_wait_s` for more; other kinds wait their turn."""
        if self._waiting:
            first = self._waiting.popleft()
        else:
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                return []
        capacity = self.capacity(first.frames)
        batch, others = [first], collections.deque()
        for item in self._waiting:
            (batch if len(batch) < capacity and item.frames == first.frames else others).append(item)
        self._waiting = others
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < capacity:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            (batch if item.frames == first.frames else self._waiting).append(item)
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]  # timed-out ones drop out
        self._release(len(batch) - len(live))
        return live

    def capacity(self, frames: int) -> int:
        """Items one call may hold: `max_batch` images, or as many videos of `frames` frames as `max_batch` frames
        hold (at least one), as `iqa score`'s video calls."""
        return self.max_batch if frames == 0 else videos_per_call(self.max_batch, frames)

    def call_size(self, images: int) -> int:
        """The rows of the call that scores `images` images: the smallest call size that holds them."""
        return next(size for size in self.call_sizes if size >= images)

    def video_call_rows(self, videos: int, frames: int) -> int:
        """The rows of the call that scores `videos` videos of `frames` frames each: `videos_per_call` of the
        smallest call size whose rows hold them (one fixed shape per call size and frame count)."""
        return next(rows for size in self.call_sizes if (rows := videos_per_call(size, frames)) >= videos)

    def warm_up(self, visual: Any) -> None:
        """One call of every call size, each row holding `visual` (one image's transform), before serving.

        Raises:
            OutOfMemory: a call of that many rows does not fit on the device (the worker should not start).
        """
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        for size in self.call_sizes:
            try:
                self._score([_Item(visual, Future())] * size, size)
            except torch.OutOfMemoryError:
                failed = size
            else:
                continue
            free_cuda_memory()  # outside `except`: the failed call's activations are released with its traceback
            raise OutOfMemory(
                f"a model call of {failed} rows does not fit in {self._device()}'s memory (warm-up with one "
                f"image in every row); lower --max-batch"
            )

    def _device(self) -> str:
        return str(getattr(self.scorer, "device", "the device"))

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # in this thread: OpenMP's thread count is per calling thread
        while not (self._stop.is_set() and self._queue.empty() and not self._waiting):
            batch = self._take()
            if not batch:
                continue
            start = time.perf_counter()
            frames = batch[0].frames
            size = self.video_call_rows(len(batch), frames) if frames else self.call_size(len(batch))
            failure: Exception | None = None
            try:
                rows = self._score(batch, size, frames)
            except torch.OutOfMemoryError:
                what = f"{len(batch)} videos of {frames} frames" if frames else f"{len(batch)} images"
                failure = OutOfMemory(f"out of memory on {self._device()} scoring {what} in a call of {size} rows")
            except Exception as err:  # a failed call fails its requests, never the worker
                failure = err
            if failure is not None:
                if isinstance(failure, OutOfMemory):
                    free_cuda_memory()
                self._release(len(batch))
                for item in batch:
                    item.future.set_exception(failure)
                continue
            if self.on_batch is not None:  # before the answers, so a client that reads /metrics next sees it
                self.on_batch(len(batch), time.perf_counter() - start)
            self._release(len(batch))
            for item, row in zip(batch, rows, strict=True):
                item.future.set_result(row)

    def _score(self, batch: list[_Item], size: int, frames: int = 0) -> list[Row]:
        """One model call of `size` rows: images, or (`frames` > 0) videos of that many frames each."""
        if frames:  # the family's video collate and the video prompt
            visual = self.scorer.video_collate([item.visual for item in batch], size, torch.float32)
            device = torch.device(self.scorer.device)
            out = self.scorer.score_video_batch({name: t.to(device) for name, t in visual.items()})
        else:
            visual = self.scorer.collate([item.visual for item in batch], size, torch.float32)
            out = self.scorer.score_batch(visual)
        rows = []
        errors = getattr(out, "errors", None)  # a reasoning model's answers without a number: no score, as failures
        for i in range(len(batch)):
            if errors is not None and errors[i] is not None:
                rows.append(Row(float("nan"), None, None, error=errors[i]))
                continue
            reg = float(out.score_reg[i]) if out.score_reg is not None else None
            std, probs = float(out.std[i]), out.probs[i].tolist()
            if std != std:  # NaN: a reasoning answer whose first digit has no digit readout (JSON has no NaN)
                std, probs = None, None
            rows.append(Row(float(out.score[i]), std, probs, reg))
        return rows
