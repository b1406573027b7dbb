"""torchrun on GPUs without a GPU: the device each rank picks under simulated launches, the process group each
command asks for, DDP's buffer traffic and FSDP2's gradient accumulation (real one-rank gloo groups on the CPU)."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from iqa_cli import distributed
from iqa_cli.errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def gpus(monkeypatch):
    """`gpus(n)`: this process sees n CUDA devices (torch.cuda's answers only; nothing touches a GPU)."""

    def see(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return see


def launched(monkeypatch, *, world: int, local_world: int, local_rank: int, rank: int | None = None):
    """Sets torchrun's variables as its launcher does; returns what `distributed.env()` reads from them."""
    values = (local_rank if rank is None else rank, world, local_rank, local_world)
    for name, value in zip(TORCHRUN_VARS, values, strict=True):
        monkeypatch.setenv(name, str(value))
    return distributed.env()


def test_each_torchrun_rank_takes_its_local_rank_gpu(monkeypatch, gpus):
    gpus(8)
    for local_rank in (0, 3, 7):
        environment = launched(monkeypatch, world=16, local_world=8, local_rank=local_rank, rank=8 + local_rank)
        assert distributed.resolve_device("auto", environment) == torch.device("cuda", local_rank)
        assert distributed.resolve_device("cuda", environment) == torch.device("cuda", local_rank)
        assert distributed.resolve_device("cpu", environment) == torch.device("cpu")


def test_a_rank_that_sees_one_gpu_uses_it_whatever_its_local_rank(monkeypatch, gpus):
    """SLURM with --gpus-per-task 1: every task sees its own GPU as cuda:0 while LOCAL_RANK counts up."""
    gpus(1)
    environment = launched(monkeypatch, world=4, local_world=4, local_rank=3)
    assert distributed.resolve_device("auto", environment) == torch.device("cuda", 0)
    assert distributed.resolve_device("cuda", environment) == torch.device("cuda", 0)


def test_more_local_ranks_than_gpus_is_one_line_on_every_rank(monkeypatch, gpus):
    gpus(2)
    for local_rank in (0, 3):  # the ranks that have a GPU refuse too, so no rank starts alone
        environment = launched(monkeypatch, world=4, local_world=4, local_rank=local_rank)
        with pytest.raises(UserError, match=r"4 processes per node but this node shows 2 CUDA devices"):
            distributed.resolve_device("auto", environment)


def test_a_numbered_gpu_under_torchrun_is_refused_where_it_would_put_every_rank_on_it(monkeypatch, gpus):
    gpus(8)
    environment = launched(monkeypatch, world=2, local_world=2, local_rank=1)
    with pytest.raises(UserError, match=r"--device cuda:1: under torchrun with 2 processes per node.*--device cuda"):
        distributed.resolve_device("cuda:1", environment)
    # One process per node (several nodes): the GPU it names is its own.
    environment = launched(monkeypatch, world=2, local_world=1, local_rank=0, rank=1)
    assert distributed.resolve_device("cuda:5", environment) == torch.device("cuda", 5)


def test_a_gpu_the_machine_lacks_is_refused_before_anything_runs(monkeypatch, gpus):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    gpus(2)
    assert distributed.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"--device cuda:2: this machine has 2 CUDA devices"):
        distributed.resolve_device("cuda:2")
    gpus(0)
    with pytest.raises(UserError, match="CUDA is not available"):
        distributed.resolve_device("cuda")
    assert distributed.resolve_device("auto") == torch.device("cpu")


@pytest.fixture
def recorded_group(monkeypatch):
    """`distributed.init` as rank 1 of 2 on cuda:1, with the group calls recorded instead of made."""
    calls: dict[str, list] = {"init": [], "new_group": [], "set_device": []}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: calls["init"].append(kw))
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kw: calls["new_group"].append(kw) or "gloo-group")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["set_device"].append(device))
    monkeypatch.setattr(distributed.process, "keep_final_collection", lambda: None)
    monkeypatch.setattr(distributed, "_owns_group", False)
    monkeypatch.setattr(distributed, "_object_group", None)
    launched(monkeypatch, world=2, local_world=2, local_rank=1)
    return calls


def test_scoring_joins_a_gloo_group_and_builds_no_nccl_communicator(recorded_group):
    """`iqa score` under torchrun: ranks exchange Python objects only, so the group is gloo even on a GPU."""
    gpu = torch.device("cuda", 1)
    distributed.init(gpu, backend="gloo")
    assert [call["backend"] for call in recorded_group["init"]] == ["gloo"]
    assert "device_id" not in recorded_group["init"][0]  # an NCCL device_id would build a communicator at once
    assert recorded_group["new_group"] == [] and distributed._object_group is None
    assert recorded_group["set_device"] == [gpu]  # the rank's GPU is still the current one


def test_training_joins_nccl_with_a_gloo_group_for_objects(recorded_group):
    gpu = torch.device("cuda", 1)
    distributed.init(gpu)
    assert recorded_group["init"][0]["backend"] == "nccl" and recorded_group["init"][0]["device_id"] == gpu
    assert [call["backend"] for call in recorded_group["new_group"]] == ["gloo"]
    assert distributed._object_group == "gloo-group"


def test_the_scoring_loop_asks_for_the_gloo_group(monkeypatch, tmp_path):
    from iqa_cli.scoring import driver
    from iqa_cli.scoring.config import ScoreConfig

    asked = []
    monkeypatch.setattr(distributed, "init", lambda device, **kw: asked.append((device, kw)))
    monkeypatch.setattr(driver, "_run", lambda *args: "ran")
    config = ScoreConfig(out=tmp_path / "s.parquet", inputs=[str(tmp_path)], device="cpu")
    assert driver.score_images(config) == "ran"
    assert asked == [(torch.device("cpu"), {"backend": "gloo"})]


@pytest.fixture
def one_rank_group():
    """A real process group of one rank (gloo, in this process), left again after the test."""
    distributed.init_single_process(torch.device("cpu"))
    yield
    distributed.destroy()


def test_ddp_does_not_resend_buffers_before_each_forward(one_rank_group):
    module = nn.Linear(3, 2)
    module.register_buffer("table", torch.arange(4.0))
    wrapped = distributed.wrap_ddp(module, torch.device("cpu"))
    assert isinstance(wrapped, nn.parallel.DistributedDataParallel) and not wrapped.will_sync_module_buffers()


def _stack(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_fsdp_accumulates_sharded_gradients_each_micro_step(one_rank_group):
    """With FSDP2 the micro steps before the last reduce-scatter too: every parameter holds its sharded gradient
    after the first micro step (with sync off FSDP2 would hold unsharded ones and leave `.grad` unset), and
    the sum over the micro steps equals the gradient of the same model unsharded."""
    sharded, plain = _stack(0), _stack(0)
    distributed.shard_units(sharded, [sharded[0], sharded[2]], torch.device("cpu"))
    torch.manual_seed(1)
    micro = [torch.randn(4, 6) for _ in range(3)]
    for i, x in enumerate(micro):
        with distributed.grad_sync(sharded, enabled=i == len(micro) - 1):
            (sharded(x).square().mean() / len(micro)).backward()
        if i == 0:
            assert all(p.grad is not None and hasattr(p.grad, "full_tensor") for p in sharded.parameters())
        (plain(x).square().mean() / len(micro)).backward()
    for (name, p), q in zip(sharded.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_tests_not_marked_gpu_run_on_the_cpu_whatever_the_machine_has():
    """tests/conftest.py hides GPUs from every test not marked `gpu`: in this process and in the subprocesses
    (the CLI, torchrun's ranks) it starts."""
    assert distributed.resolve_device("auto") == torch.device("cpu")
    code = "import torch; print(torch.cuda.is_available(), torch.cuda.device_count())"
    seen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120)
    assert seen.stdout.split() == ["False", "0"], seen.stderr
