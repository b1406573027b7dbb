"""`iqa serve` as a client sees it: the real server in a subprocess on 127.0.0.1 with a tiny released-layout
checkpoint, its JSON and pickle routes against `iqa score` on the same files, Flow-GRPO's reward client,
batch invariance, and one-line JSON refusals of bad requests while it keeps serving."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (pip install 'iqa-cli[serve]') is not installed")
requests = pytest.importorskip("requests")

TOL = 1e-5  # float32 scores of the server vs `iqa score` (different batch shapes round differently)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`iqa serve` in a subprocess; returns it and its URL once /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "iqa_cli", "serve", "--model", str(model), "--devices", "cpu"]
    proc = subprocess.Popen(
        [*command, "--dtype", "float32", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True,  # its own process group: a failed test can kill the workers too
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"iqa serve exited {proc.returncode}: {proc.stderr.read()[-3000:]}", pytrace=False)
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    kill_group(proc)
    pytest.fail(f"iqa serve did not answer /health in 180 s: {proc.communicate()[1][-3000:]}", pytrace=False)


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        _, stderr = proc.communicate(timeout=30)
        pytest.fail(f"iqa serve did not exit within {timeout} s of SIGTERM: {stderr[-3000:]}", pytrace=False)
    return proc.returncode, stderr


@contextlib.contextmanager
def serving(model: Path, *args: str) -> Iterator[str]:
    """A server for a `with` block (a module fixture's life); yields its URL and asserts it then drains on
    SIGTERM: exit 0, no traceback."""
    proc, url = start_server(model, *args)
    yield url
    code, stderr = stop_server(proc)
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the server and its workers (its process group, from start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_json_error(response, status: int, *fragments: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    reason = response.json()["error"]
    assert isinstance(reason, str) and "\n" not in reason and "Traceback" not in reason, reason
    for fragment in fragments:
        assert fragment in reason, reason
    return reason


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "deqa", seed=3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """PNG, JPEG and WebP files of several sizes and aspect ratios."""
    folder = tmp_path_factory.mktemp("serve-photos")
    rng = np.random.default_rng(0)
    for i, (w, h, fmt) in enumerate([(40, 30, "png"), (30, 40, "jpg"), (33, 33, "webp"), (64, 20, "png")]):
        pixels = np.clip(rng.normal(60 + 40 * i, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.{fmt}")
    return folder


@pytest.fixture(scope="module")
def server(checkpoint):
    """One server for the module: model calls of 4 images, up to 80 images per request."""
    with serving(checkpoint, "--max-batch", "4", "--max-wait-ms", "50", "--max-images", "80") as url:
        yield url


@pytest.fixture(scope="module")
def cli_scores(checkpoint, photos, tmp_path_factory) -> dict[str, float]:
    """`iqa score` on the same files (in this process, through Typer)."""
    import pandas as pd
    from typer.testing import CliRunner

    from iqa_cli.cli import app

    out = tmp_path_factory.mktemp("serve-score") / "scores.parquet"
    args = ["score", str(photos), "--out", str(out), "--model", str(checkpoint), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--dtype", "float32", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out)
    return dict(zip(frame["image"], frame["score"].astype(float), strict=True))


def test_json_and_pickle_routes_give_the_scores_of_iqa_score(server, photos, cli_scores):
    names = sorted(cli_scores)
    files = [(photos / name).read_bytes() for name in names]
    response = requests.post(f"{server}/score", json={"images": [b64(f) for f in files], "probs": True}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["range"] == [1, 5] and body["levels"] == ["bad", "poor", "fair", "good", "excellent"]
    assert body["errors"] == [None] * len(names)
    np.testing.assert_allclose(body["scores"], [cli_scores[n] for n in names], atol=TOL, rtol=0)
    centers = np.linspace(1, 5, 5)
    probs = np.asarray(body["probs"])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(probs @ centers, body["scores"], atol=1e-6)  # score = sum p_i c_i
    std = np.sqrt((probs * (centers[None] - probs @ centers[:, None]) ** 2).sum(1))
    np.testing.assert_allclose(body["std"], std, atol=1e-6)

    response = requests.post(f"{server}/", data=pickle.dumps({"images": files}), timeout=60)
    assert response.status_code == 200, response.text
    outputs = pickle.loads(response.content)["outputs"]  # reward-server answers score / 5
    np.testing.assert_allclose(np.asarray(outputs) * 5, [cli_scores[n] for n in names], atol=TOL, rtol=0)


def flow_grpo_deqa_client(url: str):
    """Flow-GRPO's `deqa_score_remote` (flow_grpo/rewards.py), re-implemented from its protocol: chunks of 64
    images, JPEG-encoded by PIL, a pickled {"images": [bytes]} POSTed with retries on 500, timeout 120 s, the
    pickled {"outputs": [float]} read back."""
    from requests.adapters import HTTPAdapter, Retry

    batch_size = 64
    session = requests.Session()
    retries = Retry(total=1000, backoff_factor=1, status_forcelist=[500], allowed_methods=False)
    session.mount("http://", HTTPAdapter(max_retries=retries))

    def reward(images, prompts, metadata):
        del prompts, metadata
        import torch

        if isinstance(images, torch.Tensor):
            images = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
            images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
        scores = []
        for chunk in np.array_split(images, np.ceil(len(images) / batch_size)):
            jpegs = []
            for image in chunk:
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="JPEG")
                jpegs.append(buffer.getvalue())
            response = session.post(url, data=pickle.dumps({"images": jpegs}), timeout=120)
            scores += pickle.loads(response.content)["outputs"]
        return scores, {}

    return reward, session


def test_flow_grpo_reward_client_works_by_changing_only_the_url(server, checkpoint):
    import torch

    from iqa_cli.scoring.scorer import Scorer

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(70, 3, 24, 32, generator=gen)  # a generator's output in [0, 1]: two chunks (35 + 35)
    reward, session = flow_grpo_deqa_client(server)
    scores, info = reward(images, ["a prompt"] * 70, [{}] * 70)
    assert info == {} and len(scores) == 70 and all(isinstance(s, float) for s in scores)

    # The same JPEGs through the Python API, one at a time.
    arrays = (images * 255).round().clamp(0, 255).to(torch.uint8).numpy().transpose(0, 2, 3, 1)
    jpegs = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG")
        jpegs.append(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    scorer = Scorer.from_pretrained(checkpoint, device="cpu", dtype="float32")
    expected = [r.score / 5 for r in scorer.score(jpegs, batch_size=16)]
    np.testing.assert_allclose(scores, expected, atol=TOL / 5, rtol=0)
    session.close()


def test_a_score_does_not_depend_on_which_requests_shared_its_batch(server, photos):
    files = [b64((photos / name).read_bytes()) for name in sorted(os.listdir(photos))]
    probe = files[0]

    def score(images):
        response = requests.post(f"{server}/score", json={"images": images}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["scores"]

    before = _batch_totals(server)
    alone = score([probe])[0]
    assert score([probe, *files[1:]])[0] == alone  # same request as other images
    assert score([*files[1:], probe])[-1] == alone  # another row of the batch
    results: list[float] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(score([files[1 + i % 3], probe])[1])) for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [alone] * 6  # bit for bit, whatever else was in the model call
    total, calls = (a - b for a, b in zip(_batch_totals(server), before, strict=True))
    assert calls < 1 + 2 + 6  # fewer model calls than requests: concurrent requests shared calls
    assert total == 1 + 4 + 4 + 6 * 2


def _batch_totals(server: str) -> tuple[float, float]:
    text = requests.get(f"{server}/metrics", timeout=10).text
    return _metric(text, "iqa_batch_size_sum"), _metric(text, "iqa_batch_size_count")


def _metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0].split("{")[0] == name]
    assert values, f"{name} not in /metrics"
    return sum(values)


def test_bad_requests_get_a_one_line_json_4xx_and_the_server_keeps_serving(server, photos, tmp_path):
    good = b64((photos / "0.png").read_bytes())
    post = lambda path, **kw: requests.post(f"{server}{path}", timeout=30, **kw)  # noqa: E731

    assert_json_error(post("/score", data=b"{not json"), 400, "not JSON")
    assert_json_error(post("/score", json=["a list"]), 400, "JSON object")
    assert_json_error(post("/score", json={"images": "one"}), 400, '"images" must be a list')
    assert_json_error(post("/score", json={"images": [good], "probs": "yes"}), 400, "probs")
    assert_json_error(post("/score", json={"images": [b64(b"hello, not an image")]}), 422, "images[0]", "not an image")
    assert_json_error(post("/score", json={"images": [good] * 81}), 413, "81 images", "--max-images")
    big = b"x" * (65 * 1024 * 1024)  # over the default 64 MiB
    assert_json_error(post("/score", data=big, headers={"content-type": "application/json"}), 413, "limit")
    assert_json_error(post("/", data=b"\x80\x04garbage"), 400, "not a readable pickle")
    assert_json_error(post("/", data=pickle.dumps({"images": [b"\xff\xd8 not a jpeg"]})), 422, "images[0]")
    assert_json_error(post("/", data=pickle.dumps({"images": {1, 2}})), 400, "set")
    assert_json_error(requests.get(f"{server}/score", timeout=10), 405)
    assert_json_error(requests.get(f"{server}/nowhere", timeout=10), 404)

    # One broken image among good ones is an error entry, not a failed request: a file that is no image, and an
    # entry that is no base64 at all.
    response = post("/score", json={"images": [good, b64(b"broken"), good, "not base64!!"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scores"][0] == body["scores"][2] and body["scores"][1] is None and body["scores"][3] is None
    assert body["errors"][0] is None and "not an image" in body["errors"][1]
    assert body["errors"][3].startswith("images[3]: malformed base64")

    # The server still answers.
    assert requests.get(f"{server}/health", timeout=10).json()["status"] == "ok"
    assert post("/score", json={"images": [good]}).status_code == 200


class _RunsACommand:
    """A pickle whose loading would run `touch MARKER` (os.system via __reduce__)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_runs_nothing(server, tmp_path):
    marker = tmp_path / "pwned"
    for payload in (_RunsACommand(marker), {"images": [_RunsACommand(marker)]}):
        response = requests.post(f"{server}/", data=pickle.dumps(payload), timeout=30)
        assert_json_error(response, 400, "refused pickle", "system")
    time.sleep(0.2)
    assert not marker.exists()
    assert requests.get(f"{server}/health", timeout=10).status_code == 200


def test_health_and_metrics(server):
    health = requests.get(f"{server}/health", timeout=10).json()
    assert health["status"] == "ok" and health["devices"] == ["cpu"] and health["device"] == "cpu"
    assert health["queue"] == 0 and health["max_batch"] == 4 and health["model"].endswith("deqa")
    requests.get(f"{server}/nowhere", timeout=10)
    requests.post(f"{server}/", data=b"not a pickle", timeout=10)
    requests.post(f"{server}/score", json={"images": [b64(b"not an image")]}, timeout=10)
    metrics = requests.get(f"{server}/metrics", timeout=10)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ("iqa_requests_total", "iqa_images_total", "iqa_batch_size_bucket", "iqa_request_seconds_bucket"):
        assert name in text, name
    assert _metric(text, "iqa_images_total") > 0 and _metric(text, "iqa_image_errors_total") > 0
    assert 'iqa_requests_total{route="other",status="404"}' in text  # refusals counted, paths not used as labels
    assert 'iqa_requests_total{route="/",status="400"}' in text


def test_serve_refuses_bad_options_in_one_line_before_starting(iqa, checkpoint, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = str(busy.getsockname()[1])
    cases = [
        (["--max-batch", "0"], "--max-batch 0"),
        (["--devices", "cuda:7"], "cuda:7"),
        (["--devices", "tpu"], "'tpu'"),
        (["--port", "70000"], "--port 70000"),
        (["--port", taken], f"--port {taken}: cannot listen"),
        (["--prompt", "no image token"], "--prompt"),
        (["--token", " "], "--token is empty"),
        (["--dtype", "int4"], "--dtype int4"),
        (["--max-wait-ms", "-1"], "--max-wait-ms -1"),
        (["--timeout", "0"], "--timeout 0"),
        (["--max-images", "10", "--max-queue", "5"], "--max-queue 5"),
        (["--quantize", "int3"], "--quantize int3"),
        (["--quantize", "int4"], "--quantize int4 needs a CUDA device"),
        (["--min-pixels", "1000"], "--min-pixels does not apply to mplug_owl2 models"),
        (["--min-pixels", "2000", "--max-pixels", "1000"], "--min-pixels 2000 is above --max-pixels 1000"),
        (["--max-pixels", "0"], "--max-pixels 0"),
    ]
    with busy:
        for args, fragment in cases:
            device = [] if "--devices" in args else ["--devices", "cpu"]
            code, _, err = iqa("serve", "--model", checkpoint, *device, *args)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, err)
            assert fragment in lines[0], (args, err)
    code, _, err = iqa("serve", "--model", tmp_path / "missing", "--devices", "cpu", "--prompt", "x <|image|>")
    assert code == 2 and "missing" in err, err


@pytest.mark.slow
def test_bench_serve_runs_and_reports_both_sides():
    from tests.conftest import REPO_ROOT

    args = ["--clients", "1,3", "--requests-per-client", "1", "--max-images", "4", "--min-seconds", "0.2"]
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_serve.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "in-process Scorer" in result.stdout and "serve,   3 clients:" in result.stdout
    assert "0 failed" in result.stdout and "server exit code after SIGTERM: 0" in result.stdout


def test_a_worker_that_cannot_start_stops_the_server_with_its_reason(checkpoint, tmp_path):
    from tests.conftest import run_iqa

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((checkpoint / "config.json").read_text())  # no weights, no tokenizer
    result = run_iqa("serve", "--model", str(broken), "--devices", "cpu", "--port", str(free_port()), timeout=180)
    assert result.returncode == 1, result.stderr
    assert "error: worker on cpu:" in result.stderr and str(broken) in result.stderr, result.stderr
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: a worker could not start (its reason is above); the server stopped"
    )
    assert "Traceback" not in result.stderr, result.stderr


def test_a_public_address_without_a_token_is_warned_about(iqa, checkpoint, monkeypatch):
    import uvicorn.supervisors

    started = []

    class NoWorkers:  # uvicorn's supervisor, stopped before it spawns anything
        def __init__(self, config, sockets):
            started.append((config.host, config.workers))
            self.processes = []

        def run(self):
            pass

    monkeypatch.setattr(uvicorn.supervisors, "Multiprocess", NoWorkers)
    monkeypatch.setenv("IQA_SERVE_CONFIG", "")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    port = str(free_port())
    code, _, err = iqa("serve", "--model", checkpoint, "--devices", "cpu", "--host", "0.0.0.0", "--port", port)
    assert code == 0 and started == [("0.0.0.0", 1)], err
    assert "warning: listening on 0.0.0.0 without --token: anyone who can reach this address" in err
    code, _, err = iqa(
        "serve", "--model", checkpoint, "--devices", "cpu", "--host", "0.0.0.0", "--port", port, "--token", "t"
    )
    assert code == 0 and "warning" not in err, err
