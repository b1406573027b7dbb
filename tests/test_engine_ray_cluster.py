"""`iqa score --engine ray` on a Ray cluster of two nodes on this machine (`ray.cluster_utils.Cluster`, 1 CPU
each): a node that joins mid-run gets an actor and units, a node that dies mid-run loses its actor and its units
are redone on the other, and the output equals the local engine's, each image once.

The actors record, per model call, their process and node (a file each scorer appends to), so the test sees
who scored what. A module of its own: the cluster replaces the single local Ray of tests/test_engine_ray.py.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from iqa_cli.scoring.store import sidecar_path
from tests.conftest import REPO_ROOT
from tests.test_engine_ray import score, small_units
from tests.test_score_pipeline import FakeScorer, assert_same_rows, make_image_folder

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


class CallLog(FakeScorer):
    """The fake scorer appending `<pid> <node>` to a file at each model call, and taking 0.5 s a call while the
    file `slow` exists (the test removes it once the second node has scored)."""

    def __init__(self, device, log: str, slow: str):
        super().__init__(device)
        self.log, self.slow = log, slow
        self.line = f"{os.getpid()} {ray.get_runtime_context().get_node_id()}\n"

    def score_pixels(self, pixel_values):
        with open(self.log, "a") as file:
            file.write(self.line)
        if os.path.exists(self.slow):
            time.sleep(0.5)
        return super().score_pixels(pixel_values)


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False, runtime_env=env)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _calls(log: Path) -> list[tuple[int, str]]:
    lines = log.read_text().split("\n") if log.exists() else []
    return [(int(pid), node) for pid, node in (line.split() for line in lines if line)]


def test_a_node_that_joins_gets_work_and_a_node_that_dies_has_its_units_redone(cluster, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    make_image_folder(folder)
    small_units(monkeypatch, 2)  # 13 units of 2 images
    monkeypatch.setattr("iqa_cli.engines.ray.GROW_SECONDS", 1.0)  # the driver looks for new nodes every second
    reference = tmp_path / "reference.parquet"
    score([folder], reference)
    out, log, slow = tmp_path / "scores.parquet", tmp_path / "calls", tmp_path / "slow"
    slow.touch()
    head = ray.get_runtime_context().get_node_id()
    result: dict = {}

    def run() -> None:  # a thread: Ray adds and removes nodes from the main thread only
        factory = lambda d: CallLog(d, str(log), str(slow))  # noqa: E731
        result["summary"] = score([folder], out, factory, engine="ray", batch_size=1, workers=1, flush_rows=1)

    scoring = threading.Thread(target=run)
    scoring.start()
    deadline = time.monotonic() + 120
    while len(_calls(log)) < 2 and time.monotonic() < deadline:  # the head's actor is scoring
        time.sleep(0.05)
    node = cluster.add_node(num_cpus=1, num_gpus=0)
    while not any(n != head for _, n in _calls(log)) and scoring.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)  # the new node's actor scores too
    finished = len(list(sidecar_path(out).glob("unit-????????.parquet")))
    cluster.remove_node(node, allow_graceful=False)
    slow.unlink()
    scoring.join(timeout=120)

    calls = _calls(log)
    assert {n for _, n in calls} == {head, node.node_id}  # the node that joined scored too
    assert finished < 13  # it died before the end: what it held went back in the queue
    summary = result["summary"]
    assert summary.processed == summary.total == 25
    assert_same_rows(pd.read_parquet(out), pd.read_parquet(reference))  # each image once, the same scores
