"""`iqa train --method grpo` under `torchrun --nproc-per-node 2` (gloo, CPU): TRL's DDP run, seen from the outside.

What two ranks cannot reproduce: one process's weights. TRL seeds each rank's generator with seed + rank
(`set_seed(device_specific=True)`) and each rank samples the answers of its own share of the batch, so the sampled
answers, hence the rewards and the weights, are not one process's (no tolerance makes them so: they are other
samples). What is deterministic, and tested here: the global batch (every step trains `--batch-size` images x
`--num-generations` answers over both ranks, counted from TRL's gathered token count), the run directory (written
once, by rank 0), the evaluation (each rank answers a strided share, rank 0 reports the whole test split, the same
report one process gives for the same weights), and a run stopped by SIGTERM to torchrun resumes under two ranks to
the uninterrupted run's bits (each rank's RNG comes back from its own `rng_state_<rank>.pth`)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ONE_THREAD, REPO_ROOT
from tests.test_grpo_train import _log, _meta, setup  # noqa: F401  (setup: the tiny Qwen2-VL, a pytest fixture)

IMAGES, GROUP, STEPS = 4, 4, 4  # per optimizer step over both ranks; 8 train images: 2 steps an epoch
N_TEST = 5  # strided over two ranks: 3 and 2


def _command(setup, data, out):  # noqa: F811
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "0",
        "-m", "iqa_cli", "train", "--method", "grpo", "--datasets", "odd", "--data-dir", str(data), "--model",
        str(setup["model"]), "--out", str(out), "--max-steps", str(STEPS), "--batch-size", str(IMAGES),
        "--num-generations", str(GROUP), "--max-completion-length", "6", "--lr", "1e-3", "--no-gradient-checkpointing",
        "--workers", "0", "--min-pixels", "784", "--max-pixels", "784", "--device", "cpu", "-q",
    ]  # fmt: skip


def _start(command):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def _finish(process, timeout=300):
    try:
        return process.communicate(timeout=timeout)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _prompt_tokens(setup) -> int:  # noqa: F811
    """Tokens of one image's prompt as the model reads it: the preset's conversation with its image placeholder,
    which the 784-pixel budget (2x2 patches of 14, merged 2x2) makes one image token."""
    from PIL import Image

    from iqa_cli.models.backbone import load_backbone
    from iqa_cli.reasoning import preset
    from iqa_cli.scoring.reasoning import build_reasoning_readout

    backbone = load_backbone(setup["model"], dtype=torch.float32, device="cpu", min_pixels=784, max_pixels=784)
    visual = backbone.collate([backbone.transform(Image.new("RGB", (40, 32)))], 1, torch.float32)
    assert visual["image_grid_thw"].tolist() == [[1, 2, 2]]
    return len(build_reasoning_readout(backbone, preset("visualquality-r1"), 6).input_ids)


@pytest.mark.slow
def test_two_gloo_ranks_train_grpo_as_one_run(setup, tmp_path):  # noqa: F811
    _meta(tmp_path, "odd", [1.0, 2.0, 3.0, 4.0, 5.0, 2.5, 3.5, 4.5, 3.0, 4.0, 1.5, 2.0, 4.5], n_test=N_TEST)
    data = tmp_path / "data"
    whole, broken = tmp_path / "whole", tmp_path / "broken"

    run = _start(_command(setup, data, whole))
    output = _finish(run)
    assert run.returncode == 0, output[-3000:]  # torchrun exits 0 only when both ranks did
    assert "Traceback" not in output and "find_unused_parameters" not in output, output[-3000:]  # DDP's warning

    # one run directory, written by rank 0 alone: each file once, each step's log line once, no checkpoint left
    assert sorted(os.listdir(whole)) == [
        "chat_template.jinja", "config.json", "generation_config.json", "iqa.json", "model.safetensors",
        "processor_config.json", "tokenizer.json", "tokenizer_config.json", "train_config.json", "train_log.jsonl",
    ]  # fmt: skip
    info = json.loads((whole / "iqa.json").read_text())
    assert info["method"] == "grpo" and info["steps"] == STEPS and info["family"] == "qwen2_vl"
    log = _log(whole)
    steps = [line for line in log if "reward" in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4]
    assert [line["epoch"] for line in steps] == [0.5, 1.0, 1.5, 2.0]  # 8 train images, 4 a step

    # the global batch: TRL gathers every rank's prompt and completion lengths into `num_tokens` (cumulative), so a
    # step adds IMAGES x GROUP prompts plus their answers (mean length x answers); a rank that took the whole
    # batch, or half a group, would count otherwise
    prompt = _prompt_tokens(setup)
    seen = 0
    for line in steps:
        answers = IMAGES * GROUP
        assert line["num_tokens"] - seen == pytest.approx(answers * (prompt + line["completions/mean_length"]))
        seen = line["num_tokens"]

    # the evaluation: both ranks' answers, gathered; the same report one process gives for these weights
    evals = [line for line in log if "eval" in line]
    assert len(evals) == 1 and evals[0]["step"] == STEPS
    report = evals[0]["eval"]["odd"]
    assert report["n"] == N_TEST
    assert _same_report(report, _evaluate_in_one_process(setup, data, whole)["odd"])

    # SIGTERM to torchrun once the first epoch's checkpoint is written; the same command resumes to the same bits
    run = _start(_command(setup, data, broken))
    checkpoint = broken / "checkpoints" / "checkpoint-2"
    deadline = time.monotonic() + 300
    while not (checkpoint / "trainer_state.json").exists():
        assert run.poll() is None and time.monotonic() < deadline, _finish(run, 1)[-3000:]
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGTERM)
    output = _finish(run)
    said = [line for line in output.splitlines() if line.startswith("interrupted by")]
    assert said == [  # rank 0's line, once; no rank failed on its own (torchrun names the rank that did)
        f"interrupted by SIGTERM; the last checkpoint is {checkpoint} (step 2); run the same command to resume from it"
    ], output[-3000:]
    assert "exitcode" not in output and not (broken / "iqa.json").exists(), output[-3000:]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(checkpoint))
    run = _start(_command(setup, data, broken))
    output = _finish(run)
    assert run.returncode == 0, output[-3000:]
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(broken / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _log(broken) == _log(whole)


def _evaluate_in_one_process(setup, data, run):  # noqa: F811
    """`iqa train`'s evaluation of `run`'s weights in this process (a world of one)."""
    from iqa_cli.models.backbone import load_backbone
    from iqa_cli.reasoning import preset
    from iqa_cli.scoring.reasoning import build_reasoning_readout
    from iqa_cli.training import data as train_data
    from iqa_cli.training.grpo_loop import evaluate_reasoning

    backbone = load_backbone(run, dtype=torch.float32, device="cpu", min_pixels=784, max_pixels=784)
    readout = build_reasoning_readout(backbone, preset("visualquality-r1"), 6)
    return evaluate_reasoning(backbone, readout, train_data.load_train_data(["odd"], data), batch_size=8)


def _same_report(a: dict, b: dict) -> bool:
    """Equal counts, and PLCC/SRCC equal or both undefined (fewer than two answers with a number)."""
    same = {k: a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in ("n", "unparsed", "plcc", "srcc")}
    return all(same.values())
