"""The serve app with a scorer double behind its real routes, batcher and uvicorn (in this process): the
--timeout answer, a score's independence of its batch-mates and of padding, the token and the full queue.

The double's output for a row depends on how many rows its model call has, as a kernel picked per shape rounds
differently in bfloat16: a call that lost its padding changes a score. On the CPU the real tiny model hides
that (test_serve.py's bit-for-bit test passes without the padding), so only such a double shows it. Every call
here holds at most --max-batch 8 images, so its rows are the same whether the batcher pads every call to
--max-batch or to fixed shapes of 8 rows and up.
"""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (pip install 'iqa-cli[serve]') is not installed")
requests = pytest.importorskip("requests")

from tests.test_serve import assert_json_error, free_port  # noqa: E402

LEVELS = ["bad", "poor", "fair", "good", "excellent"]
CENTERS = torch.linspace(1, 5, 5, dtype=torch.float64)
SLOW_WIDTH = 13  # images this wide make the double's call take `slow_s`


@dataclass
class Output:
    probs: torch.Tensor
    score: torch.Tensor
    std: torch.Tensor
    score_reg: None = None


class RowCountScorer:
    """The scorer contract; a row's levels come from its image's mean and from the call's row count."""

    level_names = LEVELS
    has_regressor = False
    metadata = {"model": "double"}  # noqa: RUF012 - read only

    def __init__(self, slow_s: float = 0.0, every_call_s: float = 0.0):
        self.slow_s, self.every_call_s = slow_s, every_call_s
        self.rows: list[int] = []  # rows of each call

    def transform(self, image: Image.Image) -> dict[str, torch.Tensor]:
        mean = float(np.asarray(image, dtype=np.float64).mean()) / 255
        return {"x": torch.tensor([mean, float(image.width)], dtype=torch.float64)}

    def collate(self, items, batch_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        x = torch.zeros(batch_size, 2, dtype=torch.float64)
        for row, item in enumerate(items):
            x[row] = item["x"]
        return {"x": x}

    def score_batch(self, visual: dict[str, torch.Tensor]) -> Output:
        x = visual["x"]
        self.rows.append(x.shape[0])
        time.sleep(self.every_call_s + (self.slow_s if bool((x[:, 1] == SLOW_WIDTH).any()) else 0.0))
        target = 1 + 4 * x[:, 0] + 0.5 / x.shape[0]  # the call's row count shifts every row
        probs = torch.softmax(-((target[:, None] - CENTERS) ** 2), dim=1)
        score = probs @ CENTERS
        std = (probs * (CENTERS - score[:, None]) ** 2).sum(1).sqrt()
        return Output(probs.float(), score.float(), std.float())


@contextlib.contextmanager
def served(monkeypatch, scorer: RowCountScorer, **options) -> Iterator[str]:
    """The real app of one CPU worker (create_app) on uvicorn in a thread, loading `scorer`; yields its URL."""
    import uvicorn

    from iqa_cli.scoring.scorer import Scorer
    from iqa_cli.serving import app as serve_app
    from iqa_cli.serving.config import ServeConfig

    monkeypatch.setattr(Scorer, "from_pretrained", lambda *args, **kwargs: scorer)
    monkeypatch.setattr(serve_app, "_exit_with_parent", lambda: None)
    config = ServeConfig(model="double", devices=["cpu"], port=free_port(), **options)
    server = uvicorn.Server(uvicorn.Config(serve_app.create_app(config), host="127.0.0.1", port=config.port,
                                           log_level="warning", lifespan="on"))  # fmt: skip
    threads = torch.get_num_threads()  # a CPU worker sets one intra-op thread: this process gets its own back
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(30)
        torch.set_num_threads(threads)


def _png(value: int, width: int = 20, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).normal(value, 20, (16, width, 3)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _scores(url: str, images: list[str], **kwargs) -> list[float]:
    response = requests.post(f"{url}/score", json={"images": images}, timeout=30, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()["scores"]


def _wait_idle(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while requests.get(f"{url}/health", timeout=5).json()["queue"]:
        assert time.monotonic() < deadline, "the batcher did not finish its queue"
        time.sleep(0.02)


def test_a_request_slower_than_the_timeout_gets_a_json_504_and_the_next_one_is_served(monkeypatch):
    scorer = RowCountScorer(slow_s=2.5)
    with served(monkeypatch, scorer, timeout=1.0, max_batch=4, max_wait_ms=0) as url:
        start = time.monotonic()
        response = requests.post(f"{url}/score", json={"images": [_png(90, width=SLOW_WIDTH)]}, timeout=30)
        waited = time.monotonic() - start
        assert_json_error(response, 504, "not scored within --timeout 1 s")
        assert waited < 2.3, waited  # answered at the timeout, not when the slow call ended
        _wait_idle(url)  # the slow call ends; its image no longer holds a place in the queue
        fast = requests.post(f"{url}/score", json={"images": [_png(90)]}, timeout=30)
        assert fast.status_code == 200, fast.text
        assert len(fast.json()["scores"]) == 1 and 1 < fast.json()["scores"][0] < 5
        assert requests.get(f"{url}/health", timeout=5).json()["status"] == "ok"


def test_a_score_depends_neither_on_its_batch_mates_nor_on_padding(monkeypatch):
    scorer = RowCountScorer()
    others = [_png(30 + 20 * i, seed=i + 1) for i in range(10)]
    probe = _png(140, seed=99)
    with served(monkeypatch, scorer, max_batch=8, max_wait_ms=50) as url:
        alone = _scores(url, [probe])[0]  # the only image of its call
        assert _scores(url, [*others[:7], probe])[-1] == alone  # a call of 8 images
        assert _scores(url, [*others[:2], probe])[-1] == alone  # a padded call of 3
        assert _scores(url, [*others, probe])[-1] == alone  # 11 images: 8, then a padded last call of 3
        results: list[float] = []

        def post(i: int) -> None:
            results.append(_scores(url, [others[i], probe])[1])

        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [alone] * 4  # concurrent requests in shared calls
        _wait_idle(url)
    assert len(set(scorer.rows)) == 1  # every call had the same rows, whatever it held
    double_alone = scorer.score_batch(scorer.collate([scorer.transform(Image.open(io.BytesIO(
        base64.b64decode(probe))).convert("RGB"))], 1, torch.float32)).score[0]  # fmt: skip
    assert float(double_alone) != alone  # without the padding the double scores the probe otherwise


TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_the_token_guards_every_route_but_health(monkeypatch):
    with served(monkeypatch, RowCountScorer(), token=TOKEN) as url:
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
        image = [_png(90)]
        assert_json_error(requests.post(f"{url}/score", json={"images": image}, timeout=10), 401, "missing token")
        wrong = {"Authorization": "Bearer nope"}
        assert_json_error(requests.post(f"{url}/score", json={"images": image}, headers=wrong, timeout=10), 401)
        assert_json_error(requests.get(f"{url}/metrics", timeout=10), 401)
        assert_json_error(requests.post(f"{url}/", data=b"x", timeout=10), 401)
        assert len(_scores(url, image, headers=AUTH)) == 1
        assert requests.get(f"{url}/metrics", headers=AUTH, timeout=10).status_code == 200


def test_a_full_queue_refuses_with_503_and_retry_after_while_the_queued_request_finishes(monkeypatch):
    scorer = RowCountScorer(every_call_s=0.1)
    images = [_png(20 * i, seed=i) for i in range(8)]
    with served(monkeypatch, scorer, max_batch=1, max_wait_ms=0, max_images=8, max_queue=8) as url:
        one = _scores(url, images[:1])
        long: list[requests.Response] = []
        thread = threading.Thread(
            target=lambda: long.append(requests.post(f"{url}/score", json={"images": images}, timeout=30))
        )
        thread.start()
        deadline = time.monotonic() + 10
        while requests.get(f"{url}/health", timeout=5).json()["queue"] < 4:
            assert time.monotonic() < deadline and thread.is_alive(), "the long request never filled the queue"
            time.sleep(0.01)
        refused = requests.post(f"{url}/score", json={"images": images[:1]}, timeout=10)
        assert_json_error(refused, 503, "overloaded")
        assert refused.headers["Retry-After"] == "1"
        thread.join(30)
        assert long[0].status_code == 200 and long[0].json()["scores"][0] == one[0]


@dataclass
class ReasonedOutput(Output):
    errors: list[str | None] | None = None


class PickyReasoningScorer(RowCountScorer):
    """A reasoning double whose preprocessing refuses 4-pixel-wide images (as Qwen-VL's smart_resize refuses an
    aspect ratio over 200) and whose answer for a bright image gives no number."""

    def transform(self, image: Image.Image) -> dict[str, torch.Tensor]:
        if image.width == 4:
            raise ValueError("absolute aspect ratio must be smaller than 200, got 250.0")
        return super().transform(image)

    def score_batch(self, visual: dict[str, torch.Tensor]) -> ReasonedOutput:
        out = super().score_batch(visual)
        errors = ["the answer gives no number: 'hmm'" if float(m) > 0.7 else None for m in visual["x"][:, 0]]
        return ReasonedOutput(out.probs, out.score, out.std, errors=errors)


def test_images_the_model_cannot_preprocess_or_answer_are_named_failures_not_a_500(monkeypatch):
    """`iqa score` makes both error rows: here each is its image's `images[i]:` reason, counted in
    iqa_image_errors, while the other images are scored; the pickle route refuses with what could not be scored."""
    import pickle

    from tests.test_serve import _metric

    images = [_png(90), _png(90, width=4), _png(230, seed=1)]
    with served(monkeypatch, PickyReasoningScorer(), max_batch=4, max_wait_ms=0) as url:
        response = requests.post(f"{url}/score", json={"images": images}, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["scores"][0] is not None and body["scores"][1:] == [None, None]
        assert body["errors"] == [
            None,
            "images[1]: ValueError: absolute aspect ratio must be smaller than 200, got 250.0",
            "images[2]: the answer gives no number: 'hmm'",
        ]
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        assert _metric(metrics, "iqa_image_errors_total") == 2
        raw = pickle.dumps({"images": [base64.b64decode(i) for i in images]})
        assert_json_error(
            requests.post(f"{url}/", data=raw, timeout=30), 422, "2 of 3 images could not be scored; first: images[1]:"
        )
        only = requests.post(f"{url}/score", json={"images": images[1:2]}, timeout=30)
        assert_json_error(only, 422, "no image could be scored: images[0]: ValueError")
