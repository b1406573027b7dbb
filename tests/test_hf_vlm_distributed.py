"""The transformers families under DDP and FSDP2, on the CPU with gloo: every trained parameter gets a gradient
(DDP reduces nothing else), a two-process `--lora` run on LLaVA-OneVision trains what one process trains, an
evaluation batch whose images all failed still runs the sharded forward, and an FSDP2 run's bf16 weights are
written in bf16."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from iqa_cli import distributed
from iqa_cli.models.backbone import load_backbone
from iqa_cli.models.hf_vlm.tiny import TINY_FAMILIES, tiny_checkpoint
from iqa_cli.training import TrainConfig
from iqa_cli.training.model import select_trainable
from tests.conftest import ONE_THREAD, REPO_ROOT, run_iqa
from tests.test_train_data import prepare_synthetic


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_vlm_dist")
    return {family: tiny_checkpoint(family, root / family) for family in TINY_FAMILIES}


def _image() -> Image.Image:
    gen = torch.Generator().manual_seed(0)
    return Image.fromarray((torch.rand(32, 40, 3, generator=gen) * 255).byte().numpy())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_trained_parameter_gets_a_gradient(checkpoints, family):
    """One backward pass of full tuning: a parameter left trainable without a gradient stops DDP at step 2. LLaVA-
    OneVision reads its vision tower's last layer output before `post_layernorm`, so that and SigLIP's pooling
    head are left out of training (13 tensors in the tiny config); the other families use every parameter."""
    backbone = load_backbone(checkpoints[family], dtype=torch.float32, device="cpu")
    config = TrainConfig.from_options(datasets=["x"], model=str(checkpoints[family]), out="unused", method="qalign")
    select_trainable(config, backbone, lora=False)
    backbone.model.train()
    visual = backbone.collate([backbone.transform(_image())], 1, torch.float32)
    ids = torch.tensor([backbone.encode_prompt(backbone.default_prompt)])
    logits, _ = backbone.training_forward(backbone.model, visual, ids, torch.ones_like(ids))
    logits.float().square().mean().backward()
    params = dict(backbone.model.named_parameters())
    assert [name for name, p in params.items() if p.requires_grad and p.grad is None] == []
    frozen = {name for name, p in params.items() if not p.requires_grad}
    if family == "llava_onevision":
        assert len(frozen) == 13 and all(".post_layernorm." in n or ".head." in n for n in frozen), frozen
    else:
        assert frozen == set()


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """Two gloo ranks on this machine (CPU), as `torchrun --nproc-per-node 2 iqa ...` starts them."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "0", "-m", "iqa_cli", *args]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=420)


def _adapter(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        **load_file(str(run / "adapter_model.safetensors")),
        **load_file(str(run / "non_lora_trainables.safetensors")),
    }


@pytest.mark.slow
def test_two_gloo_ranks_train_llava_onevision_lora_as_one_process(checkpoints, tmp_path):
    """DDP with every trainable tensor reduced: before the unreached vision parameters were frozen, the second step
    failed ("Expected to have finished reduction in the prior iteration"). Two ranks of half the batch each give
    one process's weights, up to float summation order."""
    data = prepare_synthetic(tmp_path, "synth", 10, size=(40, 32))
    flags = ["--datasets", "synth", "--data-dir", str(data), "--model", str(checkpoints["llava_onevision"]),
             "--method", "qalign", "--lora", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
             "--epochs", "2", "--max-steps", "3", "--batch-size", "4", "--lr", "1e-3", "--workers", "0",
             "--fixed-question", "--no-eval", "--no-gradient-checkpointing", "--device", "cpu", "-q"]  # fmt: skip
    one = run_iqa("train", *flags, "--out", str(tmp_path / "one"), env=ONE_THREAD)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun("train", *flags, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert sorted(a) == sorted(b) and not any("post_layernorm" in k or ".head." in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture
def one_rank_group():
    """A real FSDP2-capable process group of one rank (gloo, in this process), left again after the test."""
    distributed.init_single_process(torch.device("cpu"))
    yield
    distributed.destroy()


def test_an_evaluation_batch_of_failed_images_still_runs_the_sharded_forward(checkpoints, one_rank_group):
    """Under FSDP2 every rank must run each forward (it all-gathers the layers' shards inside it): a batch whose
    images all failed to decode runs the prompt through the model and answers zeros, as before. Under no_grad,
    as `training.evaluation` runs it."""
    backbone = load_backbone(checkpoints["qwen2_vl"], dtype=torch.float32, device="cpu")
    distributed.shard_units(backbone.model, backbone.fsdp_units(), torch.device("cpu"))
    forwards = []
    backbone.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    ids = torch.tensor([backbone.encode_prompt(backbone.default_prompt)] * 2)
    with torch.no_grad():
        out = backbone.forward(backbone.collate([None, None], 2, torch.float32), ids)
        assert len(forwards) == 1 and not out.logits.any() and out.logits.shape[:2] == (2, 1)
        with_image = backbone.forward(backbone.collate([backbone.transform(_image()), None], 2, torch.float32), ids)
    assert len(forwards) == 2 and with_image.logits[0].abs().sum() > 0 and not with_image.logits[1].any()


def test_fsdp_weights_are_written_in_the_dtype_the_config_names(checkpoints, one_rank_group, tmp_path):
    """A full run on GPUs trains with bf16 compute and is written in bf16: FSDP2's gathered state (float32 master
    weights) is cast too, so the safetensors hold what config.json says; Q-Scorer's MLP stays float32."""
    from safetensors import safe_open

    backbone = load_backbone(checkpoints["qwen2_vl"], dtype=torch.float32, device="cpu")
    backbone.add_regressor([16, 16])
    distributed.shard_units(backbone.model, backbone.fsdp_units(), torch.device("cpu"))
    state = distributed.full_state_dict(backbone.model)
    assert {v.dtype for v in state.values()} == {torch.float32}
    backbone.save(tmp_path / "out", state=state, dtype=torch.bfloat16, processing=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert {v.dtype for v in written.values()} == {torch.bfloat16} and len(written) > 10
    with safe_open(str(tmp_path / "out" / "regressor.safetensors"), framework="pt") as f:
        regressor = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert len(regressor) == 6  # from the gathered state: the sharded module holds only its shards
    for key, value in regressor.items():
        torch.testing.assert_close(value, state[f"iqa_regressor.{key}"], rtol=0, atol=0)
    expected = state["lm_head.weight"].to(torch.bfloat16)
    stored = written.get("lm_head.weight", written.get("model.language_model.embed_tokens.weight"))
    torch.testing.assert_close(stored, expected, rtol=0, atol=0)
