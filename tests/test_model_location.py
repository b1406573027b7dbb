"""What `--model NAME` names is decided locally first (`iqa_cli.models.hub.locate`): a path is never a repo id, a
repo the cache lacks is asked of the Hub once, quietly, and an unreachable Hub is one line at once, not 25 s of
retries. No test here reaches the network: the Hub is an address that refuses connections (HF_ENDPOINT), or
HF_HUB_OFFLINE (set by conftest) stays on.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iqa_cli.errors import UserError
from iqa_cli.models import hub
from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint
from tests.conftest import run_iqa

DEAD_HUB = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model-location")
    (root / "photos").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.png")
    write_tiny_checkpoint(root / "iqa-demo" / "run", image_size=28)
    return root


def _cache_holding(cache: Path, repo_id: str, folder: Path) -> Path:
    """A Hugging Face cache whose `main` of `repo_id` is a snapshot with `folder`'s files."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.fixture
def dead_hub(monkeypatch, tmp_path):
    """This process sees an unreachable Hub, online mode and an empty cache in tmp_path/cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", DEAD_HUB)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    hub._hub_answer.cache_clear()
    yield tmp_path / "cache"
    hub._hub_answer.cache_clear()


PATH_MISTAKES = [
    ("iqa-demo/runn", "model folder not found: iqa-demo/runn (did you mean iqa-demo/run?)"),
    ("./iqa-demo/rn", "model folder not found: ./iqa-demo/rn (did you mean iqa-demo/run?)"),
    ("photos/p0.png", "model photos/p0.png: is a file; give the model's folder or a Hugging Face repo id"),
    ("iqa-demo/run/config.json", "is a file; give the model's folder or a Hugging Face repo id (did you mean"),
    ("~/no-such-iqa-model", "model folder not found: ~/no-such-iqa-model"),
    ("a/b/c", "model folder not found: a/b/c"),
    ("tinyy", "model folder not found: tinyy"),
    ("some one/model", "model 'some one/model': no such folder here, and not a Hugging Face repo id (owner/name)"),
]


@pytest.mark.parametrize(("name", "expected"), PATH_MISTAKES, ids=[m[0] for m in PATH_MISTAKES])
def test_a_name_that_looks_like_a_path_is_never_sent_to_the_hub(iqa, place, monkeypatch, dead_hub, name, expected):
    monkeypatch.chdir(place)
    code, _, err = iqa("score", "photos", "--out", "s.parquet", "--model", name)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not hub._hub_answer.cache_info().currsize  # decided without asking the Hub
    assert not (place / "s.parquet.parts").exists()


def test_serve_and_base_take_the_same_decision(iqa, place, monkeypatch, dead_hub):
    monkeypatch.chdir(place)
    code, _, err = iqa("serve", "--model", "iqa-demo/runn")
    assert code == 2 and err == "error: model folder not found: iqa-demo/runn (did you mean iqa-demo/run?)\n", err
    code, _, err = iqa("score", "photos", "--out", "s.parquet", "--model", "iqa-demo/run", "--base", "iqa-demo/rum")
    assert code == 2 and "base model folder not found: iqa-demo/rum (did you mean iqa-demo/run?)" in err, err


def test_an_uncached_repo_with_the_hub_out_of_reach_is_one_line_at_once(place, tmp_path):
    """The real CLI, online mode, a Hub that refuses connections: before, 25 s (serve 49 s) of `Retrying in 8s`."""
    env = {"HF_ENDPOINT": DEAD_HUB, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": ""}
    for args in (["score", "photos", "--out", "s.parquet"], ["serve", "--port", "18999"]):
        start = time.monotonic()
        result = run_iqa(*args, cwd=place, env=env, timeout=120)
        seconds = time.monotonic() - start
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [
            "error: model zhiyuanyou/DeQA-Score-Mix3: not in the Hugging Face cache, and the Hub cannot be reached "
            "([Errno 111] Connection refused); use a local copy of its folder, or set HF_HUB_OFFLINE=1 (with "
            "HF_HUB_CACHE pointing at a cache that holds it)"
        ]
        assert seconds < 20, f"iqa {args[0]} took {seconds:.1f} s"  # torch's import on a busy machine; no retries


def test_offline_mode_names_the_setting(iqa, place, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.chdir(place)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    hub._hub_answer.cache_clear()
    code, _, err = iqa("score", "photos", "--out", "s.parquet", "--model", "someone/some-model")
    assert code == 2, err
    assert err == (
        "error: model someone/some-model: not in the Hugging Face cache, and HF_HUB_OFFLINE is set; use a local "
        "copy of its folder, or unset HF_HUB_OFFLINE where the Hub is reachable to download it\n"
    )


def test_a_cached_repo_scores_from_the_cache_when_the_hub_is_out_of_reach(iqa, place, monkeypatch, dead_hub):
    _cache_holding(dead_hub, "someone/tiny-deqa", place / "iqa-demo" / "run")
    monkeypatch.chdir(place)
    code, _, err = iqa("score", "photos", "--out", "cached.parquet", "--model", "someone/tiny-deqa", "--workers", "0")
    assert code == 0, err
    import pyarrow.parquet as pq

    metadata = pq.read_metadata(place / "cached.parquet").metadata
    assert metadata[b"model"] == b"someone/tiny-deqa" and metadata[b"model_revision"] == COMMIT.encode()


def test_a_typo_of_a_known_repo_is_answered_with_it(monkeypatch):
    monkeypatch.setattr(hub, "_hub_answer", lambda repo_id, revision: "missing")
    monkeypatch.setattr(hub, "cached_repos", lambda: ["someone/other-model"])
    with pytest.raises(UserError) as raised:
        hub.locate("zhiyuanyou/DeQA-Score-Mix")
    assert str(raised.value) == (
        "model zhiyuanyou/DeQA-Score-Mix: no such model repository on the Hugging Face Hub (did you mean "
        "zhiyuanyou/DeQA-Score-Mix3?)"
    )


def test_transformers_families_take_the_decision_before_transformers_is_asked(monkeypatch, dead_hub, tmp_path):
    """hf_vlm's loader goes through `hub.locate` too: an uncached repo fails at once; a cached one loads from its
    snapshot folder without touching the network, and records the repo id and commit."""
    from iqa_cli.models.hf_vlm import backbone as hf_vlm
    from iqa_cli.models.hf_vlm.tiny import tiny_checkpoint

    start = time.monotonic()
    with pytest.raises(UserError, match="the Hub cannot be reached"):
        hf_vlm.load("someone/not-cached-vl")
    assert time.monotonic() - start < 10
    _cache_holding(dead_hub, "someone/tiny-qwen", tiny_checkpoint("qwen2_vl", tmp_path / "tiny-qwen"))
    backbone = hf_vlm.load("someone/tiny-qwen")
    assert backbone.provenance.model == "someone/tiny-qwen" and backbone.provenance.revision == COMMIT
