"""Prometheus metrics of the server: requests, images, batch sizes, latencies, errors, queue depth.

With several worker processes, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by
`server.serve` before the workers start) sums every worker's numbers into each scrape.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "iqa_requests", "Requests answered, by route (or other) and HTTP status.", ["route", "status"], registry=r
        )
        self.images = Counter("iqa_images", "Images received in scoring requests, by route.", ["route"], registry=r)
        self.image_errors = Counter("iqa_image_errors", "Images that could not be scored (see errors).", registry=r)
        self.batch_size = Histogram(
            "iqa_batch_size",
            "Images per model call (each call has --max-batch rows, or one of the call sizes).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "iqa_batch_seconds", "Seconds per model call.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "iqa_request_seconds",
            "Seconds from request to answer, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Gauge(
            "iqa_queue_images", "Images accepted and not answered yet.", registry=r, multiprocess_mode="livesum"
        )

    def observe_batch(self, images: int, seconds: float) -> None:
        self.batch_size.observe(images)
        self.batch_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The scrape's body and content type: every worker's numbers in multiprocess mode, else this one's."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def forget_dead_processes() -> None:
    """Drops the live gauges of workers that died (a restarted worker calls this), so the queue depth sums
    living workers only; their counters stay, as Prometheus counters should."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    from pathlib import Path

    from prometheus_client import multiprocess

    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
