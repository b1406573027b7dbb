"""`iqa train` end to end on a tiny model: the run directory, resume after a crash or a kill, LoRA layout and
merge, two gloo processes (DDP and FSDP2) against one process, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from iqa_cli.models.mplug_owl2 import language_model
from iqa_cli.training import TrainConfig, TrainInterrupted, train
from iqa_cli.training import loop as train_loop
from iqa_cli.training.state import RunDirectory
from tests.conftest import REPO_ROOT, run_iqa
from tests.test_train_data import prepare_synthetic, write_tiny_model

TIMING = {"samples_per_s", "images_per_s"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("train-run")
    data = prepare_synthetic(tmp, "synth", 60, size=(40, 32))
    return {"tmp": tmp, "data": data, "model": write_tiny_model(tmp / "model", image_size=28)}


def _config(tiny, out: Path, **kwargs) -> TrainConfig:
    defaults = dict(datasets=["synth"], data_dir=tiny["data"], model=str(tiny["model"]), out=out, epochs=2,
                    batch_size=4, lr=1e-3, workers=0, quiet=True, mlp_dims=[16, 16])  # fmt: skip
    return TrainConfig.from_options(**{**defaults, **kwargs})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    if (run / "adapter_model.safetensors").is_file():
        tensors = load_file(str(run / "adapter_model.safetensors"))
        tensors.update(torch.load(run / "non_lora_trainables.bin", weights_only=True))
        return tensors
    return load_file(str(run / "model.safetensors"))


def _log(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


def _assert_same_weights(a: Path, b: Path, **tolerance) -> None:
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    for key in wa:
        if tolerance:
            torch.testing.assert_close(wa[key], wb[key], **tolerance, msg=key)
        else:
            assert torch.equal(wa[key], wb[key]), key


class Crash(Exception):
    pass


def _train_until_crash(monkeypatch, config: TrainConfig, step: int) -> None:
    """Runs `train(config)` and raises out of it right after optimizer step `step` is done and logged, before any
    checkpoint of that step is written."""
    record = train_loop._step_record

    def crash(session, *args):
        out = record(session, *args)
        if session.progress.global_step == step:
            raise Crash
        return out

    monkeypatch.setattr(train_loop, "_step_record", crash)
    with pytest.raises(Crash):
        train(config)
    monkeypatch.setattr(train_loop, "_step_record", record)


@pytest.mark.parametrize(
    "method, extra",
    [("deqa", {}), ("qscorer", {"lora": True, "lora_r": 4, "lora_alpha": 8.0, "w_kl": 1.0, "w_nin": 0.5})],
    ids=["deqa-full", "qscorer-lora"],
)
def test_resume_after_a_crash_equals_the_uninterrupted_run(tiny, monkeypatch, method, extra):
    """Crash right after step 9 (saves at steps 4 and 8; only the newest is kept): the same command resumes
    from step 8, and weights, optimizer path and log end exactly where the uninterrupted run ends, random draws
    included: the RNG is restored. Full tuning draws nothing at random by itself, so there dropout in the LLM's
    MLP (training mode only) draws as the LoRA dropout of the second case does."""
    if method == "deqa":
        mlp_forward = language_model.MLP.forward
        with_dropout = lambda self, x: F.dropout(mlp_forward(self, x), p=0.2, training=self.training)  # noqa: E731
        monkeypatch.setattr(language_model.MLP, "forward", with_dropout)
    whole = _config(tiny, tiny["tmp"] / f"whole-{method}", method=method, save_every=4, eval_every=8, **extra)
    result = train(whole)
    assert result.steps == 2 * (48 // 4) and result.final_eval["synth"]["n"] == 12

    broken = _config(tiny, tiny["tmp"] / f"broken-{method}", method=method, save_every=4, eval_every=8, **extra)
    _train_until_crash(monkeypatch, broken, step=9)
    assert [p.name for p in (broken.out / "checkpoints").glob("step-*")] == ["step-00000008"]
    assert not (broken.out / "iqa.json").exists()
    resumed = train(broken)
    assert resumed.resumed_from == 8 and resumed.steps_this_run == 16
    _assert_same_weights(whole.out, broken.out)
    assert _log(whole.out) == _log(broken.out)
    assert not (broken.out / "checkpoints").exists()  # removed once the run is complete
    assert train(broken).already_complete  # the same command again: nothing to do


def test_run_directory_log_and_run_file(tiny):
    out = tiny["tmp"] / "whole-deqa"  # written by the resume test above, or now
    if not (out / "iqa.json").exists():
        train(_config(tiny, out, method="deqa", save_every=4, eval_every=8))
    info = json.loads((out / "iqa.json").read_text())
    assert info["method"] == "deqa" and info["complete"] and info["steps"] == 24
    assert info["level_names"] == info["level_tokens"] == ["bad", "poor", "fair", "good", "excellent"]
    assert info["prompt"].endswith("ASSISTANT: The quality of the image is") and info["regressor"] is None
    assert "base" not in info and info["layout"] == "reference" and info["train"]["lr"] == 1e-3
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                 "preprocessor_config.json", "train_config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    log = _log(out)
    steps = [line for line in log if "loss" in line]
    evals = [line for line in log if "eval" in line]
    assert [line["step"] for line in steps] == list(range(1, 25))
    assert {"fidelity", "cross_entropy", "kl", "in_level", "lr", "grad_norm", "epoch"} <= set(steps[0])
    assert steps[0]["lr"] > steps[-1]["lr"] and steps[-1]["epoch"] == 2.0
    assert [line["step"] for line in evals] == [8, 16, 24]  # the final eval is the step-24 one
    assert set(evals[-1]["eval"]["synth"]) == {"n", "plcc", "srcc"}


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_command(tiny):
    """SIGKILL at an arbitrary moment (checkpoints every step): rerunning the command finishes the run with the
    uninterrupted run's weights."""
    base = ["train", "--datasets", "synth", "--data-dir", str(tiny["data"]), "--model", str(tiny["model"]),
            "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--workers", "0", "--no-eval", "-q"]  # fmt: skip
    whole = run_iqa(*base, "--out", str(tiny["tmp"] / "kill-whole"))  # saving does not change the numbers
    assert whole.returncode == 0, whole.stderr
    out = tiny["tmp"] / "kill-broken"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "iqa_cli", *base, "--save-every", "1", "--out", str(out)]
    proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "checkpoints").glob("step-0000000[3-9]")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "iqa.json").exists(), "the run finished before it could be killed"
    again = run_iqa(*base, "--save-every", "1", "--out", str(out))
    assert again.returncode == 0, again.stderr
    _assert_same_weights(tiny["tmp"] / "kill-whole", out)


@pytest.mark.slow
def test_sigint_says_where_the_checkpoint_is_even_in_the_background_and_the_command_resumes(tiny):
    """`iqa train ... &` from a shell starts with SIGINT ignored (Python then installs no handler): `kill -INT`
    must still stop it, with score's message (where the checkpoint is, how to resume) and exit code 130."""
    out = tiny["tmp"] / "sigint"
    command = ["train", "--datasets", "synth", "--data-dir", str(tiny["data"]), "--model", str(tiny["model"]),
               "--batch-size", "4", "--max-steps", "3", "--save-every", "1", "--workers", "0", "--no-eval",
               "--lr", "1e-3", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "iqa_cli", *command, "-q"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # what a shell does to `cmd &`
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and RunDirectory(out).latest_checkpoint() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not (out / "iqa.json").exists(), "the run finished before it could be interrupted"
    saved = RunDirectory(out).latest_checkpoint()
    step = int(saved.name.split("-")[1])
    assert err.strip().splitlines() == [
        f"interrupted by SIGINT; the last checkpoint is {saved} (step {step}); run the same command to resume from it"
    ]
    again = run_iqa(*command, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"3 steps (resumed at step {step})" in again.stderr
    assert [line["step"] for line in _log(out) if "eval" not in line] == [1, 2, 3]


def test_interrupted_message_names_the_last_complete_checkpoint_or_says_there_is_none(tmp_path):
    run = RunDirectory(tmp_path / "run")
    early = TrainInterrupted(signal.SIGTERM, run, is_main=True)
    assert early.exit_code == 143 and "before the first checkpoint" in str(early) and "same command" in str(early)
    (run.checkpoints / "step-00000004").mkdir(parents=True)
    (run.checkpoints / "step-00000004" / "trainer.pt").write_bytes(b"")
    (run.checkpoints / ".step-00000006.tmp").mkdir()  # a save cut short: not a checkpoint
    late = TrainInterrupted(signal.SIGINT, run)
    assert late.exit_code == 130 and isinstance(late, KeyboardInterrupt)
    assert str(late) == (
        f"interrupted by SIGINT; the last checkpoint is {run.checkpoints / 'step-00000004'} (step 4); run the same "
        "command to resume from it"
    )


def test_lora_layout_and_merge_equal_the_unmerged_model(tiny):
    from peft import LoraConfig, PeftModel

    from iqa_cli.models.mplug_owl2.checkpoints import load_mplug_owl2
    from iqa_cli.scoring.scorer import Scorer
    from tests.factories import random_pixels

    out = tiny["tmp"] / "lora"
    train(_config(tiny, out, lora=True, lora_r=4, lora_alpha=8.0, merge=True, epochs=1, evaluate=False))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (4, 8.0, 0.05)
    assert adapter["base_model_name_or_path"] == str(tiny["model"].resolve())
    assert adapter["target_modules"] == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1)
                                         for m in ("q_proj", "v_proj.multiway.1")]  # fmt: skip
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.v_proj.multiway.1.lora_B.weight" in keys and len(keys) == 8
    non_lora = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    assert {k.split(".")[3] for k in non_lora} == {"vision_model", "visual_abstractor"}  # base_model.model.model.*
    assert json.loads((out / "iqa.json").read_text())["base"] == str(tiny["model"].resolve())

    # the unmerged model: the base with peft's LoRA layers and the trained non-LoRA weights, run unmerged
    base = load_mplug_owl2(tiny["model"]).model
    base.load_state_dict({k.removeprefix("base_model.model."): v for k, v in non_lora.items()}, strict=False)
    lora = LoraConfig.from_pretrained(str(out))
    lora.task_type = None  # the file says CAUSAL_LM as the released adapters do; our model is no HF causal LM
    unmerged = PeftModel.from_pretrained(base, str(out), config=lora).eval()
    merged = load_mplug_owl2(out / "merged").model.eval()
    ids = torch.tensor([Scorer.from_pretrained(out, device="cpu").readout.input_ids])
    pixels = random_pixels(1, merged.config, seed=4)
    with torch.no_grad():
        a = unmerged(ids, pixels, logits_at="all").logits
        b = merged(ids, pixels, logits_at="all").logits
    assert (a - load_mplug_owl2(tiny["model"]).model(ids, pixels, logits_at="all").logits).abs().max() > 1e-3
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # `iqa score --model RUN` (LoRA merged at load onto iqa.json's base) equals the merged checkpoint
    px = random_pixels(3, merged.config, seed=5)
    lora_scores = Scorer.from_pretrained(out, device="cpu").score_pixels(px)
    merged_scores = Scorer.from_pretrained(out / "merged", device="cpu").score_pixels(px)
    torch.testing.assert_close(lora_scores.probs, merged_scores.probs, rtol=1e-5, atol=1e-6)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "0", "-m", "iqa_cli", *args]  # fmt: skip
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp-lora", "fsdp-full"])
def test_two_gloo_processes_train_what_one_process_trains(tiny, strategy):
    """The global batch is split over two ranks (DDP averages, FSDP2 reduce-scatters the gradients), so the
    result equals one process's up to float summation order. A fixed question keeps every sequence the same
    length, so each rank's token-mean CE is a mean over the same number of tokens."""
    flags = ["--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--fixed-question",
             "--eval-every", "3", "-q", "--datasets", "synth", "--data-dir", str(tiny["data"]),
             "--model", str(tiny["model"])]  # fmt: skip
    if strategy == "ddp-lora":
        flags += ["--lora", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0"]
    single = run_iqa("train", *flags, "--out", str(tiny["tmp"] / f"one-{strategy}"))
    assert single.returncode == 0, single.stderr
    double = _torchrun("train", *flags, "--out", str(tiny["tmp"] / f"two-{strategy}"))
    assert double.returncode == 0, double.stderr[-3000:]
    one_w, two_w = _weights(tiny["tmp"] / f"one-{strategy}"), _weights(tiny["tmp"] / f"two-{strategy}")
    assert sorted(one_w) == sorted(two_w)
    for key in one_w:
        # An attention key bias shifts every logit of a query equally, so its true gradient is 0 and what
        # reaches it is float noise that Adam turns into full-size steps: it can move by up to lr x steps.
        noise_only = key.endswith(("attention.key.bias", "query_key_value.bias"))
        atol = 1e-3 * 6 if noise_only else 1e-5
        torch.testing.assert_close(one_w[key], two_w[key], rtol=1e-4, atol=atol, msg=key)
    one, two = _log(tiny["tmp"] / f"one-{strategy}"), _log(tiny["tmp"] / f"two-{strategy}")
    np.testing.assert_allclose([r["loss"] for r in one if "loss" in r], [r["loss"] for r in two if "loss" in r],
                               rtol=1e-4)  # fmt: skip
    # evaluation: each rank scores a strided share of the test split, rank 0 reports all of it
    evals_one = [r["eval"]["synth"] for r in one if "eval" in r]
    evals_two = [r["eval"]["synth"] for r in two if "eval" in r]
    assert [e["n"] for e in evals_two] == [e["n"] for e in evals_one] == [12, 12]  # steps 3 and 6
    np.testing.assert_allclose([e["plcc"] for e in evals_two], [e["plcc"] for e in evals_one], atol=1e-4)
    # a global batch that does not split over the ranks is a one-line error on every rank
    bad = _torchrun("train", *flags, "--batch-size", "7", "--out", str(tiny["tmp"] / f"bad-{strategy}"))
    assert bad.returncode != 0
    assert "error: --batch-size 7 is not divisible by 2 rank(s) x 1 accumulation step(s)" in bad.stderr


# --- bad input -----------------------------------------------------------------------------------------------


def _assert_user_error(result, *needles: str) -> str:
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_bad_input_is_a_one_line_error_with_exit_code_2(tiny, iqa, tmp_path):
    data = ["--data-dir", tiny["data"], "--model", tiny["model"], "--workers", "0", "-q"]
    _assert_user_error(iqa("train", "--datasets", "koniq", *data, "--out", tmp_path / "a"),
                       "unknown dataset 'koniq'", "prepared datasets in", "synth")  # fmt: skip
    three = prepare_synthetic(tmp_path, "three", 8, size=(40, 32), extra=("--levels", "3"))
    _assert_user_error(iqa("train", "--datasets", f"synth,{three / 'three.parquet'}", *data, "--out", tmp_path / "b"),
                       "three.parquet has levels ['one', 'two', 'three'] but", "synth.parquet has")  # fmt: skip
    _assert_user_error(iqa("train", "--datasets", "synth", *data, "--out", tmp_path / "c", "--batch-size", "8",
                           "--grad-accum", "3"), "--batch-size 8 is not divisible by 1 rank(s) x 3")  # fmt: skip
    _assert_user_error(iqa("train", "--datasets", "synth", *data, "--out", tmp_path / "d", "--resume"),
                       "--resume: nothing to resume")  # fmt: skip
    _assert_user_error(iqa("train", "--datasets", "synth", *data, "--out", tmp_path / "e", "--device", "gpu0"),
                       "--device 'gpu0': not a torch device")  # fmt: skip
    _assert_user_error(iqa("train", "--datasets", "synth", *data, "--out", tmp_path / "e", "--method", "dqa"),
                       "--method must be one of deqa, qalign, qscorer")  # fmt: skip
    _assert_user_error(iqa("train", "--datasets", "synth", *data, "--out", tmp_path / "f", "--data-weights", "1,2"),
                       "--data-weights has 2 value(s) for 1 dataset(s)")  # fmt: skip
    _assert_user_error(iqa("train", "--datasets", "synth", *data, "--out", tmp_path / "g", "--batch-size", "64"),
                       "--batch-size 64 is larger than the 48 training samples")  # fmt: skip
    # --overwrite clears an earlier run only once the new one passed the checks that need its data.
    (tmp_path / "g" / "checkpoints" / "step-2").mkdir(parents=True)
    for name in ("train_config.json", "model.safetensors", "checkpoints/step-2/trainer.pt"):
        (tmp_path / "g" / name).write_text("an earlier run")
    _assert_user_error(iqa("train", "--datasets", "synth", *data, "--out", tmp_path / "g", "--batch-size", "64",
                           "--overwrite"), "--batch-size 64 is larger than the 48 training samples")  # fmt: skip
    left = sorted(str(p.relative_to(tmp_path / "g")) for p in (tmp_path / "g").rglob("*") if p.is_file())
    assert left == ["checkpoints/step-2/trainer.pt", "model.safetensors", "train_config.json"]
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "notes.txt").write_text("mine")
    _assert_user_error(iqa("train", "--datasets", "synth", *data, "--out", tmp_path / "h"),
                       "is not empty and holds no iqa training run")  # fmt: skip


def _truncated_meta(tmp_path: Path) -> Path:
    import pandas as pd

    full = tmp_path / "full.parquet"
    pd.DataFrame(
        {
            "image": ["a.png", "b.png"],
            "dataset": "d",
            "split": "train",
            "mos_norm": [1.0, 5.0],
            "std_norm": 0.5,
            "level": [0, 4],
            "soft_label": [[1.0, 0, 0, 0, 0]] * 2,
        }
    ).to_parquet(full)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])  # a copy that stopped half way
    return cut


def test_unusable_out_or_datasets_fail_before_the_run_folder_or_the_model_are_touched(iqa, tmp_path):
    """No model exists at --model: each of these must be refused on its own, before any loading."""
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "scores.csv").write_text("image,mos\na.png,3\n")
    cut = _truncated_meta(tmp_path)
    flags = ["--model", "someone/no-model", "--data-dir", tmp_path, "--workers", "0", "-q"]
    _assert_user_error(iqa("train", "--datasets", "x", *flags, "--out", tmp_path / "afile"),
                       f"--out {tmp_path / 'afile'}: is a file")  # fmt: skip
    assert (tmp_path / "afile").read_text() == "mine"
    _assert_user_error(iqa("train", "--datasets", "x", *flags, "--out", tmp_path / "afile" / "run"),
                       "afile is a file, not a folder")  # fmt: skip
    _assert_user_error(iqa("train", "--datasets", cut, *flags, "--out", tmp_path / "run"),
                       f"--datasets {cut}: not a meta written by `iqa prepare`")  # fmt: skip
    assert not (tmp_path / "run").exists()
    # --overwrite of a run must not clear it when the data turn out unusable.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "train_config.json").write_text("{}")
    _assert_user_error(iqa("train", "--datasets", cut, *flags, "--out", tmp_path / "old", "--overwrite"),
                       "not a meta")  # fmt: skip
    assert (tmp_path / "old" / "train_config.json").is_file()

    # The real console script: one line, exit 2, no pyarrow traceback.
    csv = run_iqa("train", "--datasets", str(tmp_path / "scores.csv"), *map(str, flags), "--out", str(tmp_path / "r"))
    _assert_user_error((csv.returncode, csv.stdout, csv.stderr), "scores.csv: not a meta", "iqa prepare custom")
    if os.geteuid() == 0:  # root writes through permission bits; /proc refuses new files even to root
        unwritable = Path("/proc/iqa-run")
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        unwritable = tmp_path / "locked" / "run"
    proc = run_iqa("train", "--datasets", "x", *map(str, flags), "--out", str(unwritable))
    _assert_user_error((proc.returncode, proc.stdout, proc.stderr), f"--out {unwritable}", "cannot write in folder")


def test_resuming_a_directory_of_another_configuration_is_refused(tiny, iqa, monkeypatch):
    out = tiny["tmp"] / "other-config"
    broken = _config(tiny, out, save_minutes=1e-9)  # a checkpoint after every step, by the clock
    _train_until_crash(monkeypatch, broken, step=2)  # step 2 is done, its checkpoint is not written yet
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000001"]
    line = _assert_user_error(
        iqa("train", "--datasets", "synth", "--data-dir", tiny["data"], "--model", tiny["model"], "--out", out,
            "--epochs", "2", "--batch-size", "4", "--lr", "2e-4", "--mlp-dims", "16,16", "-q"),
        "holds a run with other options", "--lr 0.001 then, 0.0002 now", "--overwrite",
    )  # fmt: skip
    assert "workers" not in line  # run-control flags may change between an interruption and its resumption

    # The same flags on data prepared again with another split: the sampler's position would mean nothing.
    src = tiny["tmp"] / "synth-src"
    resplit = tiny["tmp"] / "resplit"
    prepared = run_iqa("prepare", "custom", "--csv", str(src / "scores.csv"), "--images", str(src / "images"),
                       "--image-col", "image", "--mos-col", "mos", "--std-col", "std", "--name", "synth", "--seed", "7",
                       "--data-dir", str(resplit), "--json")  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr
    same_flags = ["train", "--datasets", "synth", "--model", tiny["model"], "--out", out, "--epochs", "2",
                  "--batch-size", "4", "--lr", "1e-3", "--mlp-dims", "16,16", "--workers", "0", "-q"]  # fmt: skip
    _assert_user_error(iqa(*same_flags, "--data-dir", resplit), "holds a run trained on other data",
                       str(resplit / "synth.parquet"), "--overwrite")  # fmt: skip
    # The original metas with their images reached through a copy of the folder (--images): it resumes.
    moved = tiny["tmp"] / "moved-images"
    if not moved.exists():
        shutil.copytree(src / "images", moved)
    code, _, err = iqa(*same_flags, "--data-dir", tiny["data"], "--images", moved)
    assert code == 0, err
    assert RunDirectory(out).is_finished()
    # Finished, then its data prepared again: said so, not "nothing to do".
    _assert_user_error(iqa(*same_flags, "--data-dir", resplit), "holds a finished run trained on other data",
                       str(resplit / "synth.parquet"), "--overwrite to train again")  # fmt: skip
    code, _, err = iqa(*same_flags[:-1], "--data-dir", tiny["data"], "--images", moved)  # without -q
    assert code == 0 and "nothing to do" in err, err


@pytest.mark.slow
def test_benchmark_gpu_code_path_runs_on_cpu_with_the_tiny_config():
    """`bench_train.py --gpu` (LoRA, and full tuning under a one-rank FSDP2 group) with the tiny config."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_train.py", "--gpu", "--tiny", "--device", "cpu", "--steps", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "samples/s" in line]
    assert len(lines) == 2 and "lora" in lines[0] and "full FSDP2" in lines[1], proc.stdout


def test_two_datasets_pair_within_each_and_undecodable_images_are_skipped(tiny, tmp_path):
    """Two metas train together (partners never cross datasets: the fidelity target compares one dataset's
    scores); an image that cannot be decoded is skipped with its pair and reported, and evaluation reports
    each dataset on its own."""
    other = prepare_synthetic(tmp_path, "other", 24, seed=3, size=(40, 32))
    images = tmp_path / "other-src" / "images"
    (images / "img0001.png").write_bytes(b"not a png")  # a train image (the split is seeded below)
    out = tmp_path / "two"
    result = train(_config(tiny, out, datasets=["synth", str(other / "other.parquet")], epochs=1, data_weights=[1, 2]))
    assert any("img0001.png" in reason for reason in result.skipped_images)
    assert set(result.final_eval) == {"synth", "other"}
    from iqa_cli.prepare import read_meta

    frame, _ = read_meta(other / "other.parquet")
    assert frame.loc[frame["image"] == "img0001.png", "split"].item() == "train"
    n_other = int((frame["split"] == "train").sum())
    assert result.steps == (48 + 2 * n_other) // 4  # --data-weights 1,2 repeats the second dataset's rows


@pytest.mark.parametrize("method", ["deqa", "qscorer"])
def test_three_levels_named_by_the_meta_train_and_score(tiny, tmp_path, method):
    from iqa_cli.scoring.scorer import Scorer
    from tests.factories import random_pixels

    three = prepare_synthetic(tmp_path, "three", 24, size=(40, 32), extra=("--levels", "3"))
    out = tmp_path / f"three-{method}"
    train(_config(tiny, out, datasets=[str(three / "three.parquet")], method=method, epochs=1, evaluate=False))
    info = json.loads((out / "iqa.json").read_text())
    assert info["level_names"] == ["one", "two", "three"]
    tokens = ["<score1>", "<score2>", "<score3>"] if method == "qscorer" else ["one", "two", "three"]
    assert info["level_tokens"] == tokens
    scorer = Scorer.from_pretrained(out, device="cpu")
    assert scorer.level_names == ["one", "two", "three"] and list(scorer.readout.input_ids) == info["input_ids"]
    batch = scorer.score_pixels(random_pixels(2, scorer.model.config, seed=0))
    assert batch.probs.shape == (2, 3) and (batch.score_reg is not None) == (method == "qscorer")


def test_gradient_accumulation_follows_the_same_loss_path_as_one_big_batch(tiny, tmp_path):
    """Two micro batches of 4 pairs per step give the losses of one batch of 8 pairs (equal-length prompts, so
    every term is a mean over the same counts)."""
    runs = {}
    for accum in (1, 2):
        out = tmp_path / f"accum-{accum}"
        train(_config(tiny, out, batch_size=8, grad_accum=accum, fixed_question=True, epochs=1, evaluate=False))
        runs[accum] = [r["loss"] for r in _log(out) if "loss" in r]
    assert len(runs[1]) == 6
    np.testing.assert_allclose(runs[2], runs[1], rtol=1e-5)


def test_overwrite_clears_the_run_and_the_family_model_files_and_nothing_else(tmp_path):
    run = RunDirectory(tmp_path / "run")
    written = ["train_config.json", "train_log.jsonl", "iqa.json", "config.json", "model-00001-of-00002.safetensors",
               "model.safetensors.index.json", "non_lora_trainables.bin", "tokenizer.model",
               "checkpoints/step-2/trainer.pt", "merged/model.safetensors"]  # fmt: skip
    for name in [*written, "notes.txt", "images/a.png"]:
        (run.out / name).parent.mkdir(parents=True, exist_ok=True)
        (run.out / name).write_text("x")
    run.clear()
    left = sorted(str(p.relative_to(run.out)) for p in run.out.rglob("*") if p.is_file())
    assert left == ["images/a.png", "notes.txt"]
