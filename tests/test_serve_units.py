"""The serving pieces without a server: the data-only unpickler, request parsing, the batcher's fixed-shape
calls, its bounded queue and timed-out requests."""

from __future__ import annotations

import asyncio
import base64
import collections
import pickle
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (pip install 'iqa-cli[serve]') is not installed")

from iqa_cli.images import ImageDecodeError
from iqa_cli.serving.batcher import Batcher, Overloaded
from iqa_cli.serving.requests import BadRequest, decode_image, parse_json, parse_pickle
from iqa_cli.serving.safe_pickle import UnsafePickleError, loads_data


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_round_trips_in_every_protocol(protocol):
    value = {"images": [b"\xff\xd8jpeg", b""], "n": 3, "x": 1.5, "ok": True, "none": None, "t": (1, "a"), "s": "é"}
    if protocol < 3:  # bytes need a global (_codecs.encode) before protocol 3: refused, which is the point
        with pytest.raises(UnsafePickleError, match="_codecs"):
            loads_data(pickle.dumps(value, protocol=protocol))
        value.pop("images")
    assert loads_data(pickle.dumps(value, protocol=protocol)) == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({1, 2}, "set"),
        (frozenset([1]), "frozenset"),
        (bytearray(b"x"), "bytearray"),
        (collections.OrderedDict(a=1), "collections.OrderedDict"),
        (torch.zeros(1), "torch"),
        (len, "builtins.len"),  # not print: Ray, run in-process by other tests, replaces builtins.print
    ],
)
def test_anything_but_plain_data_is_refused(value, fragment):
    with pytest.raises(UnsafePickleError, match=fragment):
        loads_data(pickle.dumps(value, protocol=5))


def test_deep_nesting_and_garbage_are_refused():
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(UnsafePickleError, match="deeper"):
        loads_data(pickle.dumps(deep))
    for garbage in (b"", b"\x80\x05", b"not a pickle", pickle.dumps({"a": 1})[:-3]):
        with pytest.raises(ValueError, match="not a readable pickle"):
            loads_data(garbage)


def test_request_parsing():
    png = b"\x89PNG fake"
    request = parse_json(b'{"images": ["%s", "data:image/png;base64,%s"]}' % ((base64.b64encode(png),) * 2), 8)
    assert request.images == [png, png] and request.probs is False
    assert parse_pickle(pickle.dumps({"images": [png], "extra": 1}), 8).images == [png]
    for body, status, fragment in [
        (b'{"images": ["a", "b", "c"]}', 413, "3 images"),
        (b"\xff", 400, "not JSON"),
    ]:
        with pytest.raises(BadRequest, match=fragment) as info:
            parse_json(body, 2)
        assert info.value.status == status
    # An entry that carries no file is that image's error, as an undecodable file is; the others are kept.
    request = parse_json(b'{"images": [1, "data:image/png,abc", "not base64!!", "%s"]}' % base64.b64encode(png), 8)
    reasons = []
    for entry in request.images[:3]:
        with pytest.raises(ImageDecodeError) as info:
            decode_image(entry, 1000)
        reasons.append(info.value.reason)
    assert reasons[0] == "expected a base64 string, got int" and "must be base64" in reasons[1]
    assert reasons[2].startswith("malformed base64") and request.images[3] == png
    request = parse_pickle(pickle.dumps({"images": ["a string", png]}), 8)
    assert isinstance(request.images[0], ImageDecodeError) and "expected encoded image bytes" in str(request.images[0])
    assert request.images[1] == png


class FakeScorer:
    """Records the batch size of each model call; a row's score is its pixel value."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[int, int]] = []  # (rows in the call, images in it)
        self.delay = delay

    def collate(self, items, batch_size, dtype):
        pixels = torch.zeros(batch_size, dtype=dtype)
        for i, item in enumerate(items):
            pixels[i] = item
        self.calls.append((batch_size, len(items)))
        return {"pixel_values": pixels}

    def score_batch(self, visual):
        time.sleep(self.delay)
        x = visual["pixel_values"]
        return type("Out", (), {"score": x, "std": x * 0, "probs": x[:, None], "score_reg": None})()


def test_every_model_call_has_max_batch_rows_and_requests_share_calls():
    scorer = FakeScorer(delay=0.05)
    batcher = Batcher(scorer, max_batch=4, max_wait_s=0.05, queue_limit=64)
    batcher.start()

    async def main():
        return await asyncio.gather(*(batcher.score([float(i), float(10 + i)]) for i in range(5)))

    results = asyncio.run(main())
    batcher.stop()
    assert [[r.score for r in rows] for rows in results] == [[float(i), float(10 + i)] for i in range(5)]
    assert {rows for rows, _ in scorer.calls} == {4}  # always 4 rows
    assert sum(n for _, n in scorer.calls) == 10 and max(n for _, n in scorer.calls) > 2  # requests shared calls


def test_a_full_queue_refuses_and_a_timed_out_request_is_dropped():
    scorer = FakeScorer(delay=0.3)
    batcher = Batcher(scorer, max_batch=1, max_wait_s=0, queue_limit=3)
    batcher.start()

    async def main():
        first = asyncio.ensure_future(batcher.score([1.0, 2.0, 3.0]))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await batcher.score([4.0])
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(first, timeout=0.1)

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while batcher.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert batcher.pending == 0  # cancelled images released their places
    assert len(scorer.calls) < 3  # and were not all scored
    batcher.stop()


def test_each_worker_claims_a_device_no_other_live_worker_holds(tmp_path):
    from iqa_cli.serving.app import claim_device
    from iqa_cli.serving.config import ServeConfig

    config = ServeConfig(devices=["cuda:0", "cuda:1"], lock_dir=str(tmp_path))
    first, first_lock = claim_device(config)
    second, second_lock = claim_device(config)
    assert (first, second) == ("cuda:0", "cuda:1")
    with pytest.raises(RuntimeError, match="held by another worker"):
        claim_device(config)
    first_lock.release()  # the worker on cuda:0 died: its replacement gets cuda:0
    assert claim_device(config)[0] == "cuda:0"
    second_lock.release()


def test_a_worker_loads_the_model_with_every_loading_option_of_the_command(monkeypatch, tmp_path):
    """`iqa serve --quantize/--min-pixels/--max-pixels` reach `Scorer.from_pretrained` in the worker process,
    through the config the supervisor hands over in the environment."""
    from iqa_cli.model_options import ModelSpec
    from iqa_cli.scoring.scorer import Scorer
    from iqa_cli.serving import app
    from iqa_cli.serving.config import CONFIG_ENV, ServeConfig

    model = ModelSpec("m", "b", "r", "p", "float32", "int8", {"min_pixels": 784, "max_pixels": 3136})
    sent = ServeConfig(model=model, devices=["cpu"], task="aesthetics")
    monkeypatch.setenv(CONFIG_ENV, sent.to_env())
    received = ServeConfig.from_env()
    assert received == sent
    calls = []

    class Loaded(Exception):
        pass

    def from_pretrained(model, **options):
        calls.append((model, options))
        raise Loaded

    monkeypatch.setattr(Scorer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(app, "_exit_with_parent", lambda: None)
    threads = torch.get_num_threads()  # a CPU worker sets one thread: give this process its own back
    try:
        with pytest.raises(Loaded):
            app.Worker(received, metrics=None).start()
    finally:
        torch.set_num_threads(threads)
    assert calls == [("m", {"base": "b", "device": "cpu", "dtype": "float32", "prompt": "p", "revision": "r",
                            "quantize": "int8", "min_pixels": 784, "max_pixels": 3136,
                            "task": "aesthetics"})]  # fmt: skip


@pytest.mark.parametrize("flag", ["--device", "--devices"])
def test_serve_takes_device_as_score_does(iqa, monkeypatch, flag):
    """`iqa serve --device cpu` (score's spelling) and `--devices cpu` reach the server as the same config."""
    from iqa_cli.serving import server

    started = []
    monkeypatch.setattr(server, "serve", lambda config, say: started.append(config))
    code, _, err = iqa("serve", flag, "cpu", "--model", "org/model", "--min-pixels", "784", "--dtype", "bf16")
    assert code == 0, err
    assert started[0].devices == ["cpu"] and started[0].model.model == "org/model"
    assert started[0].model.family == {"min_pixels": 784} and started[0].model.load_kwargs()["dtype"] == "bfloat16"
