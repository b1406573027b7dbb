"""`iqa serve` over its life, as processes: the token handed to the worker, a worker killed with -9 (restarted
by the supervisor), and SIGTERM while a request is in flight (it finishes, new ones are refused, exit 0). The
token on every route and the full queue (503 + Retry-After) are checked on the app in one process:
test_serve_app.py."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (pip install 'iqa-cli[serve]') is not installed")
requests = pytest.importorskip("requests")

from tests.test_serve import assert_json_error, kill_group, start_server  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _png(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except requests.RequestException:  # refused, reset, or queued behind a worker still starting
            value = None
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}", pytrace=False)


def test_token_worker_restart_and_sigterm_drain(tmp_path):
    from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "deqa", seed=5)
    proc, url = start_server(checkpoint, "--max-batch", "1", "--max-wait-ms", "0", env={"IQA_SERVE_TOKEN": TOKEN})
    images = [_png(i) for i in range(8)]
    try:
        # The token: /health is open, everything else needs it.
        health = requests.get(f"{url}/health", timeout=10).json()
        assert_json_error(requests.post(f"{url}/score", json={"images": images[:1]}, timeout=10), 401, "missing token")
        wrong = {"Authorization": "Bearer nope"}
        assert_json_error(requests.post(f"{url}/score", json={"images": images[:1]}, headers=wrong, timeout=10), 401)
        assert_json_error(requests.get(f"{url}/metrics", timeout=10), 401)
        one = requests.post(f"{url}/score", json={"images": images[:1]}, headers=AUTH, timeout=30)
        assert one.status_code == 200, one.text

        # kill -9 of the worker: uvicorn's supervisor starts another, which loads the model and serves.
        os.kill(health["pid"], signal.SIGKILL)
        new_pid = lambda: (h := requests.get(f"{url}/health", timeout=5).json())["pid"] != health["pid"] and h  # noqa: E731
        restarted = _wait(new_pid, 180, "a new worker")
        assert restarted["device"] == "cpu"
        again = requests.post(f"{url}/score", json={"images": images[:1]}, headers=AUTH, timeout=30)
        assert again.status_code == 200 and again.json()["scores"] == one.json()["scores"]

        # SIGTERM with a request in flight (its body half sent, so it cannot finish before the signal): new
        # requests are refused, the in-flight one is answered in full, then the server exits 0.
        body = json.dumps({"images": images}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=60)
        conn.putrequest("POST", "/score")
        for key, value in {**AUTH, "Content-Type": "application/json", "Content-Length": str(len(body))}.items():
            conn.putheader(key, value)
        conn.endheaders()
        conn.send(body[: len(body) // 2])
        _wait(lambda: requests.get(f"{url}/health", timeout=5).json()["in_flight"] == 1, 30, "the request in flight")
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)  # the supervisor forwards SIGTERM within 0.5 s; uvicorn stops accepting within 0.1 s
        try:
            late = requests.post(f"{url}/score", json={"images": images[:1]}, headers=AUTH, timeout=3)
        except requests.RequestException:
            pass  # the worker no longer accepts connections
        else:
            assert_json_error(late, 503, "shutting down")  # or says so on a connection still open
        conn.send(body[len(body) // 2 :])
        answer = conn.getresponse()
        assert answer.status == 200
        scores = json.loads(answer.read())["scores"]
        assert len(scores) == 8 and scores[0] == one.json()["scores"][0]
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            pytest.fail(f"no exit within 60 s of SIGTERM: {proc.communicate(timeout=30)[1][-3000:]}", pytrace=False)
        assert proc.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
    finally:
        kill_group(proc)  # the server and any worker left, whatever happened above
        proc.communicate(timeout=30)
