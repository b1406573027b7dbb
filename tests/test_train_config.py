"""`iqa_cli.training.config`: the nested run configuration built from the flat option names, and the flat
record runs are written with (run directories from before the nested config must still resume)."""

from __future__ import annotations

from pathlib import Path

import pytest

from iqa_cli.training.config import RUN_CONTROL_FIELDS, TrainConfig
from iqa_cli.training.state import RunDirectory, plan_run

# The keys of train_config.json / iqa.json "train" as every run so far was written (the flat TrainConfig).
RECORD_KEYS = [
    "datasets", "out", "model", "base", "method", "data_dir", "images", "data_weights", "epochs", "max_steps",
    "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "seed",
    "gradient_checkpointing", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "freeze_vision",
    "freeze_abstractor", "w_fid", "w_tok", "w_kl", "w_in_level", "fid_std", "detach_pred_std", "closed_set", "w_mse",
    "min_pixels", "max_pixels",
    "mse_clamp", "w_nin", "w_rank", "rank_margin", "mlp_dims", "layout", "fixed_question", "fps", "frames",
    "max_frames", "eval_every", "evaluate",
    "eval_batch_size", "save_every", "save_minutes", "keep_checkpoints", "merge", "strategy", "device", "workers",
    "resume", "overwrite", "wait", "quiet",
    # --method grpo's section (issue 21): None for the other methods, as a record without these keys reads them
    "prompt_preset", "reward", "reward_threshold", "w_reward", "w_format", "num_generations", "beta",
    "max_completion_length", "temperature", "top_k",
]  # fmt: skip


def test_options_land_in_their_sections_and_the_record_stays_flat(tmp_path):
    config = TrainConfig.from_options(
        datasets=["a"], out=tmp_path / "run", lora=True, lora_r=4, eval_every=8, data_weights=[2], model="m"
    )
    assert config.lora.enabled and config.lora.r == 4 and config.eval.every == 8 and config.data.repeats == [2]
    assert config.model.name == "m" and config.lora.alpha == 256.0  # untouched options keep their defaults
    record = config.to_json()
    assert sorted(record) == sorted(RECORD_KEYS)
    assert record["lora"] is True and record["lora_r"] == 4 and record["data_weights"] == [2]
    assert record["out"] == str(tmp_path / "run") and record["mlp_dims"] == [2048, 1024]
    assert {
        "out", "eval_every", "evaluate", "eval_batch_size", "save_every", "save_minutes", "keep_checkpoints", "merge",
        "device", "workers", "resume", "overwrite", "wait", "quiet", "data_dir", "images", "data_fingerprint",
    } == RUN_CONTROL_FIELDS  # fmt: skip
    with pytest.raises(TypeError, match="lora_rank"):
        TrainConfig.from_options(out=tmp_path, lora_rank=4)


def test_a_run_recorded_flat_before_the_split_is_the_same_configuration(tmp_path):
    """A record written by the flat TrainConfig (same keys, same values) plans as the same run; a changed
    option is still named by its flat key."""
    out = tmp_path / "run"
    old = {key: None for key in RECORD_KEYS}
    old.update(TrainConfig.from_options(datasets=["a"], out=out).to_json())
    RunDirectory(out).start({**old, "data_fingerprint": "abc"})
    same = TrainConfig.from_options(datasets=["a"], out=Path(str(out)), quiet=True, eval_every=5)  # control options
    assert plan_run(RunDirectory(out), same.to_json(), RUN_CONTROL_FIELDS) == "fresh"
    other = TrainConfig.from_options(datasets=["a"], out=out, lora_r=8)
    assert "--lora-r 128 then, 8 now" in plan_run(RunDirectory(out), other.to_json(), RUN_CONTROL_FIELDS)


@pytest.mark.parametrize(
    "method, weights",
    [
        ("deqa", {"w_fid": 1.0, "w_tok": 0.05, "w_kl": 1.0}),
        ("qalign", {"w_fid": 0.0, "w_tok": 1.0, "w_kl": 0.0}),
        ("qscorer", {"w_fid": 0.0, "w_tok": 0.05, "w_kl": 0.0}),
    ],
)
def test_each_method_fills_in_its_own_default_weights(tmp_path, method, weights):
    assert TrainConfig.from_options(out=tmp_path, method=method).weights() == weights
    given = TrainConfig.from_options(out=tmp_path, method=method, w_kl=0.5).weights()
    assert given == {**weights, "w_kl": 0.5}
    assert TrainConfig.from_options(out=tmp_path, method=method).paired == (method == "deqa")
    assert not TrainConfig.from_options(out=tmp_path, method="deqa", w_fid=0.0).paired


def test_the_command_line_defaults_are_the_configs_defaults():
    """`iqa train`'s flags and `TrainConfig`'s fields declare each default twice: they must agree."""
    import inspect

    from iqa_cli.cli import train

    record = TrainConfig.from_options(out=Path("run"), datasets=[]).to_json()
    parsed = {"mlp_dims": lambda text: [int(x) for x in text.split(",")]}
    flags = inspect.signature(train).parameters
    assert set(flags) - {"datasets", "out"} == set(record) - {"datasets", "out"}  # every option, no other
    for name, parameter in flags.items():
        if name in ("datasets", "out"):  # required
            continue
        default = parameter.default.default
        if parameter.default.param_decls == ("--no-" + name.replace("_", "-"),):  # an off switch, not given
            assert default is False and record[name] is True, name
            continue
        if default is None and name in ("lr", "epochs", "warmup_ratio", "model"):  # the method's: deqa's here
            deqa = {"lr": 2e-5, "epochs": 3, "warmup_ratio": 0.03, "model": "MAGAer13/mplug-owl2-llama2-7b"}
            assert record[name] == deqa[name], name
            continue
        assert parsed.get(name, lambda v: v)(default) == record[name], name


def test_an_off_switch_turns_its_setting_off_and_leaves_it_on_when_absent(monkeypatch):
    """`--no-gradient-checkpointing` is a lone off switch (a --x/--no-x pair cut `iqa train -h` at 80 columns):
    given, the setting is off; absent, on."""
    from typer.testing import CliRunner

    import iqa_cli.training
    from iqa_cli.cli import app

    seen = []

    class Stop(Exception):
        pass

    def record(config, *args, **kwargs):
        seen.append(config.model.gradient_checkpointing)
        raise Stop  # the flags reached the config; nothing is trained

    monkeypatch.setattr(iqa_cli.training, "train", record)
    for extra in ([], ["--no-gradient-checkpointing"]):
        result = CliRunner().invoke(app, ["train", "--datasets", "x", "--out", "run", *extra])
        assert isinstance(result.exception, Stop), result.output
    assert seen == [True, False]
