"""`iqa train --method grpo` (iqa_cli/training/grpo.py) on a tiny Qwen2-VL with a small word-level vocabulary: the run
directory is a standard transformers checkpoint that `iqa score` reads as a reasoning model with no flag, an
interrupted run resumes to the uninterrupted run's weights and log, a learnable task's reward rises, and mistakes
are one-line errors before anything loads."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from iqa_cli import interrupts
from iqa_cli.errors import UserError
from iqa_cli.models.hf_vlm.tiny import tiny_reasoning_checkpoint
from iqa_cli.prepare import write_meta
from iqa_cli.training import TrainConfig, TrainInterrupted, grpo_loop, train
from iqa_cli.training.state import RunDirectory
from tests.conftest import ONE_THREAD, run_iqa
from tests.forked_cli import Launcher

LEVELS = json.dumps(["bad", "poor", "fair", "good", "excellent"])


def _meta(root, name, mos_norm, n_test=2, suffix=".png", **metadata):
    """A prepared meta of len(mos_norm) random 40x32 images, the last `n_test` in the test split (rows named
    `suffix`: ".mp4" makes them videos by name)."""
    images = root / f"{name}-images"
    images.mkdir()
    rng = np.random.default_rng(len(mos_norm))
    n = len(mos_norm)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    mos = np.asarray(mos_norm, dtype=float)
    frame = pd.DataFrame(
        {
            "image": [f"{i}{suffix}" for i in range(n)], "dataset": name,
            "split": ["train"] * (n - n_test) + ["test"] * n_test, "mos": 20 * mos, "std": np.full(n, 5.0),
            "mos_norm": mos, "std_norm": np.full(n, 0.5),
            "level": np.clip(np.round(mos).astype(int) - 1, 0, 4),
        }
    )  # fmt: skip
    metadata = {"level_names": LEVELS, "levels": "5", "image_root": str(images), "dataset": name, **metadata}
    write_meta(frame, np.full((n, 5), 0.2), metadata, root / "data" / f"{name}.parquet")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    (root / "data").mkdir()
    _meta(root, "synth", [1.0, 2.0, 3.0, 4.0, 5.0, 2.5, 3.5, 4.5, 3.0, 4.0])
    _meta(root, "learn", [4.0] * 10)  # one answer is right for every image: a task a tiny model can learn
    return {"root": root, "data": root / "data", "model": tiny_reasoning_checkpoint(root / "model", seed=0)}


TINY = {"batch_size": 4, "num_generations": 4, "max_completion_length": 6, "gradient_checkpointing": False,
        "workers": 0, "quiet": True, "min_pixels": 784, "max_pixels": 784}  # fmt: skip


def _config(setup, out, **options):
    options = {"model": str(setup["model"]), **TINY, **options}
    return TrainConfig.from_options(datasets=["synth"], data_dir=setup["data"], out=out, method="grpo", **options)


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_iqa_train_grpo_writes_a_standard_checkpoint_that_scores_as_a_reasoning_model(setup, tmp_path):
    from transformers import AutoModelForImageTextToText

    from iqa_cli.scoring.scorer import Scorer

    out = tmp_path / "run"
    command = [
        "train", "--method", "grpo", "--datasets", "synth", "--data-dir", str(setup["data"]), "--model",
        str(setup["model"]), "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--num-generations", "4",
        "--max-completion-length", "6", "--no-gradient-checkpointing", "--workers", "0", "--min-pixels", "784",
        "--max-pixels", "784", "-q",
    ]  # fmt: skip
    result = run_iqa(*command, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    info = json.loads((out / "iqa.json").read_text())
    assert info["method"] == "grpo" and info["family"] == "qwen2_vl" and info["steps"] == 2
    assert info["reasoning"] == {"preset": "visualquality-r1", "max_new_tokens": 6}
    recorded = json.loads((out / "train_config.json").read_text())  # the recipe's values, as used
    assert (recorded["reward"], recorded["beta"], recorded["lr"], recorded["warmup_ratio"]) == (
        "fidelity",
        0.04,
        1e-6,
        0,
    )
    log = _log(out)
    steps = [line for line in log if "reward" in line]
    assert [line["step"] for line in steps] == [1, 2]
    assert {"loss", "lr", "grad_norm", "kl", "rewards/fidelity/mean", "rewards/format/mean"} <= set(steps[0])
    assert log[-1]["eval"]["synth"]["n"] == 2  # the test split, answered greedily
    assert not (out / "checkpoints").exists()
    AutoModelForImageTextToText.from_pretrained(out)  # a standard transformers checkpoint
    scorer = Scorer.from_pretrained(out, device="cpu", dtype="float32")  # no flag: iqa.json says how
    assert scorer.reasoning and scorer.readout.max_new_tokens == 6 and scorer.metadata["method"] == "grpo"
    assert scorer.backbone.images_kwargs == {"size": {"shortest_edge": 784, "longest_edge": 784}}
    again = _config(setup, out, max_steps=2)  # the same command (in process): the run is complete
    assert train(again).already_complete


@pytest.mark.parametrize(
    "options", [{}, {"lora": True, "lora_r": 4, "lora_alpha": 8.0}],
    ids=["full", "lora"],
)  # fmt: skip
def test_an_interrupted_run_resumes_to_the_uninterrupted_runs_weights_and_log(
    setup, tmp_path, monkeypatch, options, one_thread
):
    """4 steps of 2 per epoch (checkpoints at each epoch's end), SIGINT after step 3: the same command resumes
    from step 2 into the second epoch, with the fidelity and format rewards and the KL term (beta 0.04), and ends
    with the uninterrupted run's weights and log, the sampled answers included."""

    def config(name):
        return _config(setup, tmp_path / name, max_steps=4, lr=1e-3, evaluate=False, **options)

    whole = config("whole")
    train(whole)
    original = grpo_loop.RunCallback.on_log

    def interrupted(self, args, state, control, logs=None, **kwargs):
        original(self, args, state, control, logs=logs, **kwargs)
        if state.global_step == 3:
            raise interrupts.Interrupted(signal.SIGINT)

    broken = config("broken")
    monkeypatch.setattr(grpo_loop.RunCallback, "on_log", interrupted)
    with pytest.raises(TrainInterrupted, match=r"the last checkpoint is .*checkpoint-2 \(step 2\)"):
        train(broken)
    monkeypatch.setattr(grpo_loop.RunCallback, "on_log", original)
    assert not (broken.out / "iqa.json").exists()
    # A later checkpoint cut short while transformers wrote its trainer state (not atomically): it is passed over
    saved = broken.out / "checkpoints" / "checkpoint-2"
    cut = shutil.copytree(saved, saved.with_name("checkpoint-3"))
    state = (cut / "trainer_state.json").read_text()
    (cut / "trainer_state.json").write_text(state[: len(state) // 2])
    assert RunDirectory(broken.out).latest_checkpoint() == saved
    resumed = train(broken)
    assert resumed.resumed_from == 2 and resumed.steps == 4 and resumed.steps_this_run == 2
    weights = "adapter_model.safetensors" if options else "model.safetensors"
    a, b = load_file(str(whole.out / weights)), load_file(str(broken.out / weights))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _log(whole.out) == _log(broken.out)
    assert train(broken).already_complete


@pytest.mark.slow
def test_the_mean_reward_rises_on_a_learnable_task(setup, tmp_path, one_thread):
    """Every image's MOS is 4 and the vocabulary holds five digits: the threshold reward (1 when the answer's first
    number is within 0.35 of 4) starts near chance and, within 20 steps, its mean over the last five steps is above
    the first three steps' by 0.25 or more (measured: 0.2 -> 0.65 for model seeds 0-3)."""
    config = TrainConfig.from_options(
        datasets=["learn"], data_dir=setup["data"], model=str(setup["model"]), out=tmp_path / "learn",
        method="grpo", max_steps=20, reward="threshold", w_format=0.0, beta=0.0, lr=1e-2, evaluate=False,
        **{**TINY, "num_generations": 8},
    )  # fmt: skip
    train(config)
    reward = [line["reward"] for line in _log(config.out) if "reward" in line]
    assert len(reward) == 20
    assert np.mean(reward[-5:]) >= np.mean(reward[:3]) + 0.25, reward


def test_grpo_options_are_checked_before_anything_loads(setup, tmp_path):
    def error(**options):
        with pytest.raises(UserError) as caught:
            train(_config(setup, tmp_path / "x", **options))
        return str(caught.value)

    assert error(batch_size=1) == (
        "--reward fidelity compares each image with the others of a rank's batch: --batch-size 1 gives 1 per rank; "
        "use at least 2"
    )
    assert error(batch_size=3, grad_accum=8) == (
        "--batch-size 3 images x --num-generations 4 answers do not split over 1 rank(s) x --grad-accum 8; choose a "
        "batch size whose answers divide evenly"
    )
    assert error(num_generations=1) == "--num-generations must be >= 2 (a group), got 1"
    assert error(prompt_preset="deqa").startswith("--prompt-preset must be one of q-insight")
    assert error(strategy="fsdp").startswith("--method grpo trains as TRL does under torchrun")
    # the other methods' options, which GRPO would silently ignore, only when they differ from their defaults
    ignored = "does not apply to --method grpo, which would ignore it"
    for flag, value in [("layout", "scoring"), ("fixed_question", True), ("w_fid", 0.0), ("w_tok", 1.0),
                        ("w_kl", 0.5), ("w_mse", 2.0), ("mlp_dims", [8]), ("fps", 2.0), ("frames", 4)]:  # fmt: skip
        assert error(**{flag: value}) == f"--{flag.replace('_', '-')} {ignored}"
    assert error(layout="reference", mlp_dims=[2048, 1024], batch_size=1).startswith("--reward fidelity")
    owl = tmp_path / "owl"
    owl.mkdir()
    (owl / "config.json").write_text(json.dumps({"model_type": "mplug_owl2"}))
    assert error(model=str(owl)).startswith("--method grpo trains the transformers families (qwen2_vl")
    assert not (tmp_path / "x").exists()  # nothing was written
    result = run_iqa("train", "--datasets", "synth", "--out", str(tmp_path / "y"), "--reward", "threshold")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == ["error: --reward applies to --method grpo"]


def test_grpo_trains_the_papers_base_model_by_default(tmp_path):
    """Without --model, --method grpo trains Qwen2.5-VL-7B-Instruct (the base of Q-Insight and VisualQuality-R1,
    a family it can train), not the other methods' mPLUG-Owl2 default; an explicit --model wins."""

    def model(**options):
        return TrainConfig.from_options(datasets=["synth"], out=tmp_path / "x", **options).model.name

    assert model(method="grpo") == model(method="grpo", prompt_preset="q-insight") == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert model() == "MAGAer13/mplug-owl2-llama2-7b"
    assert model(method="grpo", model="some/model") == "some/model"
    assert TrainConfig.from_options(datasets=["s"], out=tmp_path, method="grpo").to_json()["model"] == model(
        method="grpo"
    )


def test_a_dataset_of_another_task_or_of_videos_is_refused_before_the_run_starts(setup, tmp_path):
    """The presets ask about image quality: AVA's aesthetics and KoNViD-1k's videos are one-line errors (exit 2)
    before the lock or the model, not a run trained with the quality question or one that dies at its first batch."""
    data = tmp_path / "data"
    data.mkdir()
    _meta(tmp_path, "ava", [1.0, 2.0, 3.0, 4.0, 5.0, 3.0], task="aesthetics")
    _meta(tmp_path, "clips", [1.0, 2.0, 3.0, 4.0, 5.0, 3.0], suffix=".mp4")

    command = ["train", "--method", "grpo", "--datasets", "ava", "--data-dir", data, "--model", setup["model"],
               "--out", tmp_path / "run", "--batch-size", "4", "--workers", "0", "-q"]  # fmt: skip
    ava = run_iqa(*map(str, command), env=ONE_THREAD)
    assert ava.returncode == 2 and ava.stderr.strip().splitlines() == [
        f"error: {data / 'ava.parquet'}: task aesthetics; --method grpo asks its presets' question about image quality "
        "(train aesthetics with --method deqa, qalign, qscorer)"
    ]
    config = TrainConfig.from_options(datasets=["clips"], data_dir=data, out=tmp_path / "run", method="grpo",
                                      model=str(setup["model"]), **TINY)  # fmt: skip
    with pytest.raises(UserError) as caught:
        train(config)
    assert str(caught.value) == f"{data / 'clips.parquet'}: 0.mp4 is a video; --method grpo trains on images"
    assert not (tmp_path / "run").exists()  # no lock, no run folder


def test_a_training_image_that_does_not_decode_is_left_out_with_one_warning(setup, tmp_path, capsys):
    """As the other methods do: the run goes on, the file is named once (its group reads it four times), and its
    place in the batch goes to another train row drawn from (seed, row), the same on every read."""
    from iqa_cli.reasoning import preset
    from iqa_cli.training import data as train_data
    from iqa_cli.training.grpo import train_dataset

    _meta(tmp_path, "broken", [1.0, 2.0, 3.0, 4.0, 5.0, 2.5, 3.5, 4.5, 3.0, 4.0])
    bad = tmp_path / "broken-images" / "3.png"
    bad.write_bytes(b"not a png")
    data = train_data.load_train_data(["broken"], tmp_path / "data")
    pool = np.arange(len(data.train))
    said = []
    dataset = train_dataset(data.train, pool, preset("visualquality-r1"), 7, said.append)
    first, again = dataset[[3, 3]]["row"], dataset[3]["row"]
    assert first[0] == first[1] == again != 3 and dataset[3]["mos"] == data.train.mos[again]
    assert train_dataset(data.train, pool, preset("visualquality-r1"), 8)[3]["row"] != 3
    assert said == [f"warning: skipped an image that cannot be decoded: {bad} (not an image Pillow can read)"]

    config = TrainConfig.from_options(datasets=["broken"], data_dir=tmp_path / "data", out=tmp_path / "run",
                                      method="grpo", model=str(setup["model"]), max_steps=2, evaluate=False,
                                      **{**TINY, "quiet": False})  # fmt: skip
    capsys.readouterr()
    result = train(config)
    assert result.steps == 2 and (config.out / "iqa.json").is_file()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == said


@pytest.mark.slow
def test_a_stop_sent_to_the_process_group_ends_a_run_with_decoding_workers_in_one_line(setup, tmp_path):
    """SIGTERM to the whole group (`kill %1`, a scheduler) while `--workers 1` decodes: the worker leaves the signal
    to the main process, which exits 143 with the one line the other methods' stops print, its checkpoint kept."""
    out = tmp_path / "run"
    _meta(tmp_path, "many", np.linspace(1, 5, 64), n_test=4)  # 15 batches an epoch: the worker is busy when stopped
    command = ["train", "--method", "grpo", "--datasets", "many", "--data-dir", tmp_path / "data", "--model",
               setup["model"], "--out", out, "--max-steps", "200", "--save-every", "1", "--batch-size", "4",
               "--num-generations", "4", "--max-completion-length", "6", "--no-gradient-checkpointing", "--workers",
               "1", "--min-pixels", "784", "--max-pixels", "784", "--no-eval", "-q"]  # fmt: skip
    directory = RunDirectory(out)
    with Launcher(env=ONE_THREAD) as launch:
        run = launch(*command, log=tmp_path / "stopped.log")
        deadline = time.monotonic() + 180
        while directory.latest_checkpoint() is None or int(directory.latest_checkpoint().name.split("-")[1]) < 3:
            assert run.poll() is None, run.output()[-3000:]
            assert time.monotonic() < deadline, run.output()[-3000:]
            time.sleep(0.05)
        # the group's signal as it reaches the decoding worker first (a race with a big model; made certain here)
        tasks = Path(f"/proc/{run.pid}/task").iterdir()
        workers = [pid for task in tasks for pid in (task / "children").read_text().split()]
        assert workers, "no decoding worker"
        for pid in workers:
            os.kill(int(pid), signal.SIGTERM)
        time.sleep(1.0)
        run.signal(signal.SIGTERM, group=True)
        assert run.wait() == 128 + signal.SIGTERM, run.output()[-3000:]
    saved = directory.latest_checkpoint()
    step = int(saved.name.split("-")[1])
    lines = [line for line in run.output().splitlines() if line.strip()]
    assert lines == [
        f"interrupted by SIGTERM; the last checkpoint is {saved} (step {step}); run the same command to resume from it"
    ], run.output()[-3000:]
    assert 3 <= step < 200 and not (out / "iqa.json").exists()


def test_the_help_states_the_defaults_a_grpo_run_resolves(tmp_path):
    """Each `[default: ...]` of the optimizer and GRPO options names the value a config of that method (and each
    preset) resolves to; --workers, --batch-size, the pixel budget and the generation budget say what holds for grpo."""
    import dataclasses
    import re

    from iqa_cli.model_options import COMMON, family_options
    from iqa_cli.process import MAX_WORKERS
    from iqa_cli.reasoning import PRESETS
    from iqa_cli.training.config import ControlConfig, GRPOConfig, OptimizerConfig

    def helps(kind):
        return {f.name: f.metadata["help"] for f in dataclasses.fields(kind)}

    def default(text):
        return re.search(r"\[default: ([^\]]*)\]", text).group(1)

    def shown(value):
        return f"{value:g}".replace("e-0", "e-") if isinstance(value, float) else str(value)

    base = TrainConfig.from_options(datasets=["s"], out=tmp_path)
    for name in ("lr", "epochs", "warmup_ratio"):
        for preset in PRESETS:
            grpo = TrainConfig.from_options(datasets=["s"], out=tmp_path, method="grpo", prompt_preset=preset)
            expected = f"{shown(getattr(base.optim, name))}; grpo {shown(getattr(grpo.optim, name))}"
            assert default(helps(OptimizerConfig)[name]) == expected, name
    for field in dataclasses.fields(GRPOConfig):
        if field.name in ("preset", "reward"):
            continue
        values = {
            p: shown(getattr(TrainConfig.from_options(datasets=["s"], out=tmp_path, method="grpo",
                                                      prompt_preset=p).grpo, field.name))
            for p in PRESETS
        }  # fmt: skip
        text = default(field.metadata["help"])
        if len(set(values.values())) == 1:
            assert text.split(",")[0] == next(iter(values.values())), field.name
        else:
            assert text == ", ".join(f"{p} {v}" for p, v in values.items()), field.name
    assert (
        default(helps(GRPOConfig)["preset"])
        == TrainConfig.from_options(datasets=["s"], out=tmp_path, method="grpo").grpo.preset
    )
    assert f"at most {MAX_WORKERS}; grpo 0" in helps(ControlConfig)["workers"]
    assert "--num-generations" in helps(OptimizerConfig)["batch_size"]
    for option in family_options():
        if option.name in ("min_pixels", "max_pixels"):
            assert "448x448" in option.help and "--method grpo too" in option.help
    budget = {p.thinking: p.max_new_tokens for p in PRESETS.values()}
    tokens = next(o for o in COMMON if o.name == "max_new_tokens")
    assert f"else {budget[True]} ({budget[False]} without thinking)" in tokens.help
