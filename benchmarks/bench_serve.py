"""`iqa serve` under concurrent clients, next to the in-process `Scorer` on the same images in the same run.

Starts the real server (a subprocess on 127.0.0.1, a free port), then for each client count runs that many
client threads, each sending a bounded number of `POST /score` requests of 1..64 images (seeded sizes), and
prints images/s, p50/p95/p99 latency and the server's mean batch size (from /metrics). Before that, the same
decode -> transform -> fixed-shape model calls run in this process on the same images: the ratio of the two
is the server's overhead (HTTP, base64, JSON, queueing).

    python benchmarks/bench_serve.py                                    # tiny random model on the CPU
    python benchmarks/bench_serve.py --model zhiyuanyou/DeQA-Score-Mix3 --devices 0 --dtype bfloat16 \
        --image-size 448 --clients 1,16,64

On the CPU the server's worker runs one intra-op thread (batch invariance, see README), so the in-process
figure is measured with one thread too. Client threads run in this process and share the machine's cores.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image


def encoded_pool(count: int, size: tuple[int, int], seed: int) -> list[bytes]:
    """JPEG files of noisy gradients (what a generator hands a reward model), `size` = (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    pool = []
    for _ in range(count):
        pixels = np.clip(base + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        pool.append(buffer.getvalue())
    return pool


def in_process(args, model: str, pool: list[bytes]) -> float:
    """Images/s of decode -> transform -> collate (max_batch rows) -> score_batch, as a server worker does it."""
    from iqa_cli.images import load_image
    from iqa_cli.scoring.scorer import Scorer

    device = "cpu" if args.devices == "cpu" else f"cuda:{args.devices.split(',')[0]}"
    if device == "cpu":
        torch.set_num_threads(1)
    scorer = Scorer.from_pretrained(model, device=device, dtype=args.dtype)

    def one_pass() -> int:
        for start in range(0, len(pool), args.max_batch):
            chunk = [scorer.transform(load_image(io.BytesIO(b))) for b in pool[start : start + args.max_batch]]
            scorer.score_batch(scorer.collate(chunk, args.max_batch, torch.float32))
        return len(pool)

    one_pass()  # warm-up
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.min_seconds:
        images += one_pass()
    if device != "cpu":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "iqa_cli", "serve", "--model", model, "--devices", args.devices]
    command += ["--dtype", args.dtype, "--port", str(port), "--max-batch", str(args.max_batch)]
    command += ["--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(max(64 * max(args.clients), 256))]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"iqa serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("iqa serve did not start in 600 s")


def batch_totals(url: str) -> tuple[float, float]:
    """(sum, count) of the server's iqa_batch_size histogram."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    found = dict(re.findall(r"^iqa_batch_size_(sum|count) (\S+)$", text, re.M))
    return float(found.get("sum", 0)), float(found.get("count", 0))


def load(url: str, clients: int, args, bodies: dict[int, bytes]) -> dict:
    latencies: list[float] = []
    counts: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + args.max_seconds

    def client(index: int) -> None:
        rng = np.random.default_rng(1000 + index)
        session = requests.Session()
        for _ in range(args.requests_per_client):
            if time.monotonic() > stop_at:
                break
            n = int(rng.integers(1, args.max_images + 1))
            start = time.perf_counter()
            response = session.post(
                f"{url}/score", data=bodies[n], headers={"content-type": "application/json"}, timeout=300
            )
            elapsed = time.perf_counter() - start
            with lock:
                if response.status_code == 200:
                    latencies.append(elapsed)
                    counts.append(n)
                else:
                    failures.append(f"{response.status_code} {response.text[:100]}")

    before = batch_totals(url)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = batch_totals(url)
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    calls = after[1] - before[1]
    return {
        "clients": clients,
        "requests": len(latencies),
        "failed": len(failures),
        "images": sum(counts),
        "seconds": wall,
        "images_per_s": sum(counts) / wall,
        "p50_ms": 1000 * q[49],
        "p95_ms": 1000 * q[94],
        "p99_ms": 1000 * q[98],
        "mean_batch": (after[0] - before[0]) / calls if calls else 0.0,
        "first_failure": failures[0] if failures else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory or repo id [default: a tiny random model]")
    parser.add_argument("--model-image-size", type=int, default=28, help="tiny model's input side (multiple of 14)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the JPEGs sent (height is 3/4 of it)")
    parser.add_argument("--devices", default="cpu", help="cpu, or GPU indices (the in-process run uses the first)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-images", type=int, default=64, help="requests carry 1..this many images")
    parser.add_argument("--max-seconds", type=float, default=120, help="per client count: no new requests after")
    parser.add_argument("--min-seconds", type=float, default=5, help="in-process timing at least this long")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=10)
    parser.add_argument("--json", action="store_true", help="one JSON object per client count")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint

        model = str(write_tiny_checkpoint(Path(tmp.name) / "tiny", image_size=args.model_image_size, seed=0))
    pool = encoded_pool(args.max_images, (args.image_size, args.image_size * 3 // 4), seed=0)
    b64 = [base64.b64encode(b).decode() for b in pool]
    bodies = {n: json.dumps({"images": b64[:n]}).encode() for n in range(1, args.max_images + 1)}

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
        f"torch {torch.__version__}"
    )
    print(f"model {model if args.model else 'tiny random (mplug-owl2-tiny)'}, devices {args.devices}, {args.dtype}, "
          f"max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms, JPEG {args.image_size} px")  # fmt: skip
    local = in_process(args, model, pool)
    print(f"in-process Scorer (decode, transform, {args.max_batch}-row calls): {local:.1f} images/s")
    proc, url = start_server(args, model)
    try:
        for _ in range(2):  # warm-up, as the in-process run had: the first model calls are slower
            requests.post(f"{url}/score", data=bodies[args.max_images], headers={"content-type": "application/json"})
        for clients in args.clients:
            row = load(url, clients, args, bodies)
            row["ratio_to_in_process"] = row["images_per_s"] / local
            if args.json:
                print(json.dumps(row))
                continue
            print(
                f"serve, {clients:3d} clients: {row['images_per_s']:8.1f} images/s ({row['ratio_to_in_process']:.2f}x "
                f"in-process), latency p50 {row['p50_ms']:.0f} / p95 {row['p95_ms']:.0f} / p99 {row['p99_ms']:.0f} ms, "
                f"mean batch {row['mean_batch']:.1f}, {row['requests']} requests, {row['images']} images, "
                f"{row['failed']} failed"
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        tmp.cleanup()
    print(f"server exit code after SIGTERM: {proc.returncode}; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
