"""`iqa serve` on a GPU's terms, checked on the CPU with the tiny checkpoint: a warm-up call of every call shape
before the worker is ready, a `--max-batch` that does not fit stops the worker at start in one line, a call
that runs out of memory later answers 503 in one line and the worker goes on, and smaller fixed call shapes
(`call_sizes`) each batch-invariant on their own. Out-of-memory is simulated by a `score_batch` that raises
torch's own `OutOfMemoryError` above a number of rows."""

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from iqa_cli.errors import UserError
from iqa_cli.model_options import ModelSpec
from iqa_cli.scoring.scorer import Scorer
from iqa_cli.serving import app
from iqa_cli.serving.batcher import Batcher, OutOfMemory
from iqa_cli.serving.config import ServeConfig
from iqa_cli.serving.metrics import Metrics


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", image_size=28)


@pytest.fixture
def rows_per_call(monkeypatch):
    """Records the rows of every model call; `fits` (rows -> bool) decides which run out of memory."""
    calls: list[int] = []
    state = {"fits": lambda rows: True}
    score_batch = Scorer.score_batch

    def recorded(self, visual):
        rows = next(iter(visual.values())).shape[0]
        calls.append(rows)
        if not state["fits"](rows):
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows} GiB.\nSee the docs.")
        return score_batch(self, visual)

    monkeypatch.setattr(Scorer, "score_batch", recorded)
    monkeypatch.setattr(app, "_exit_with_parent", lambda: None)
    threads = torch.get_num_threads()  # a CPU worker sets one thread: give this process its own back
    yield calls, state
    torch.set_num_threads(threads)


def _config(checkpoint, **options) -> ServeConfig:
    return ServeConfig(model=ModelSpec(str(checkpoint), dtype="float32"), devices=["cpu"], max_wait_ms=0, **options)


def test_the_worker_warms_up_one_full_call_of_each_size_before_it_is_ready(checkpoint, rows_per_call):
    calls, _ = rows_per_call
    worker = app.Worker(_config(checkpoint, max_batch=4, call_sizes=[1, 2]), metrics=Metrics())
    worker.start()
    try:
        assert calls == [1, 2, 4]
    finally:
        worker.stop()


def test_a_max_batch_that_does_not_fit_stops_the_worker_at_start_in_one_line(checkpoint, rows_per_call):
    calls, state = rows_per_call
    state["fits"] = lambda rows: rows <= 2
    with pytest.raises(OutOfMemory) as caught:
        app.Worker(_config(checkpoint, max_batch=4), metrics=Metrics()).start()
    message = str(caught.value)
    assert message == (
        "a model call of 4 rows does not fit in cpu's memory (warm-up with one image in every row); lower --max-batch"
    )
    assert calls == [4]


def _png() -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), 90, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_call_that_runs_out_of_memory_answers_503_in_one_line_and_the_worker_goes_on(checkpoint, rows_per_call):
    from fastapi.testclient import TestClient

    calls, state = rows_per_call
    with TestClient(app.create_app(_config(checkpoint, max_batch=2))) as client:
        assert calls == [2]  # the warm-up, before the first request
        state["fits"] = lambda rows: False
        refused = client.post("/score", json={"images": [_png()]})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        reason = refused.json()["error"]
        assert reason == (
            "out of memory on cpu scoring 1 images in a call of 2 rows; retry later, or restart the server with a "
            "smaller --max-batch"
        )
        state["fits"] = lambda rows: True
        answered = client.post("/score", json={"images": [_png()]})
        assert answered.status_code == 200 and len(answered.json()["scores"]) == 1


def test_a_call_takes_the_smallest_size_that_holds_its_images_and_each_size_is_batch_invariant(checkpoint):
    """A lone image runs in a call of 1 row, three in a call of 4. Within one size a score does not depend on the
    batch-mates, bit for bit (one thread); across sizes it agrees within float32 rounding."""
    torch.manual_seed(0)
    scorer = Scorer.from_pretrained(checkpoint, device="cpu", dtype="float32")
    batcher = Batcher(scorer, max_batch=4, max_wait_s=0, queue_limit=16, call_sizes=[1, 2], threads=1)
    assert batcher.call_sizes == (1, 2, 4) and [batcher.call_size(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    rng = np.random.default_rng(0)
    probe, a, b = (scorer.transform(Image.fromarray(rng.integers(0, 256, (30, 26, 3), dtype=np.uint8))) for _ in "pab")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with_a = batcher._score([type("I", (), {"visual": v}) for v in (probe, a)], 2)[0]
        with_b = batcher._score([type("I", (), {"visual": v}) for v in (probe, b)], 2)[0]
        alone = batcher._score([type("I", (), {"visual": probe})], 1)[0]
        padded = batcher._score([type("I", (), {"visual": probe})], 4)[0]
    finally:
        torch.set_num_threads(threads)
    assert with_a.probs == with_b.probs and with_a.score == with_b.score
    np.testing.assert_allclose([alone.score, padded.score], with_a.score, rtol=0, atol=1e-5)

    async def lone():
        batcher.start()
        try:
            return await batcher.score([probe])
        finally:
            batcher.stop()

    rows = asyncio.run(lone())
    assert rows[0].score == alone.score  # a lone request really ran in a call of 1 row


def test_call_sizes_are_checked_before_anything_starts():
    # (the flag's text -> list: tests/test_user_mistakes.py runs `iqa serve --call-sizes eight`)
    assert ServeConfig(devices=["0", "cuda:1", "cpu"]).devices == ["cuda:0", "cuda:1", "cpu"]  # --devices 0,...
    with pytest.raises(UserError, match=r"--call-sizes 128: each must be between 1 and --max-batch \(64\)"):
        ServeConfig(devices=["cpu"], call_sizes=[8, 128]).check()
    sent = ServeConfig(devices=["cpu"], call_sizes=[8, 16])
    assert ServeConfig(**json.loads(sent.to_env())).call_sizes == [8, 16]
