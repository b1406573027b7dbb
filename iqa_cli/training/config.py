"""The configuration of an `iqa train` run: a few nested dataclasses, one comment per field.

Each field is one command-line option. Its option name (`--lora-r` -> `lora_r`) is the field name, or the
`flag` in its metadata where the section already says it (`lora.r`). `TrainConfig.from_options` builds the
nested config from those flat names (what the CLI parsed), and `to_json` writes them back flat: the record
in `train_config.json` and `iqa.json` keeps the key names runs have always been written with, so a run
directory from before the split still resumes or is recognised as complete.

Defaults are the reference runs' (`scripts/train.sh`, `train_lora.sh` of DeQA-Score and Q-Scorer); `--method grpo`
takes its recipe's (`GRPO_RECIPES`: the training scripts of Q-Insight and VisualQuality-R1). A default that depends
on the method is None on the field and filled in when the config is built, so the record holds the value used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from iqa_cli.errors import UserError
from iqa_cli.model_options import ModelSpec, family_options
from iqa_cli.models.backbone import family_package
from iqa_cli.option_field import option
from iqa_cli.paths import check_output_dir
from iqa_cli.process import MAX_WORKERS
from iqa_cli.reasoning import GRPO, PRESETS

LAYOUTS = ("reference", "scoring")  # image first (what the released models trained on) | the scoring prompt's
REWARDS = ("threshold", "fidelity")
STRATEGIES = ("auto", "ddp", "fsdp")
DEFAULT_TRAIN_MODEL = family_package().DEFAULT_TRAIN_MODEL  # the default family's base model
DEFAULT_MLP_DIMS = (2048, 1024)


def _lora_targets_help() -> str:
    family = family_package()
    name = family.__name__.rpartition(".")[2]
    return (
        "Comma-separated module-name suffixes of the language model's linear layers [default: the model family's, "
        f"as its reference trains; {name}: {','.join(family.LORA_TARGETS)}]."
    )


@dataclass(frozen=True)
class GRPORecipe:
    """A released recipe's GRPO settings (its training script and its trainer's defaults)."""

    reward: str
    num_generations: int
    beta: float
    max_completion_length: int = 256  # both scripts (VisualQuality-R1 sets it in code, Q-Insight keeps the default)
    lr: float = 1e-6  # their GRPOConfig's default, which neither script changes
    epochs: int = 10
    warmup_ratio: float = 0.0  # a linear decay from the first step
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"  # the base model both papers train


# Q-Insight `run_qinsight_score_and_dist.sh`; VisualQuality-R1 `run_scripts/KADID-10K/one_node_run_kadid.sh` (its
# `--beta` unset: its GRPOConfig's 0.04).
GRPO_RECIPES = {
    "q-insight": GRPORecipe("threshold", 8, 0.001),
    "visualquality-r1": GRPORecipe("fidelity", 6, 0.04),
    "visualquality-r1-nothink": GRPORecipe("fidelity", 6, 0.04),
}
DEFAULT_GRPO_PRESET = "visualquality-r1"
# --method grpo's defaults that no recipe changes: the threshold reward's (Q-Insight's), the reward weights, and
# transformers' sampling defaults the recipes ran with.
GRPO_DEFAULTS = {"threshold": 0.35, "w_reward": 1.0, "w_format": 1.0, "temperature": 1.0, "top_k": 50}
# The optimizer's method defaults: DeQA-Score's scripts (the GRPO recipes': `GRPORecipe`).
OPTIM_DEFAULTS = {"lr": 2e-5, "epochs": 3, "warmup_ratio": 0.03}


def _number(value: object) -> str:
    return f"{value:g}".replace("e-0", "e-") if isinstance(value, float) else str(value)


def _recipes(name: str) -> str:
    """A recipe field's default in help: one value, or each preset's."""
    shown = {preset: _number(getattr(recipe, name)) for preset, recipe in GRPO_RECIPES.items()}
    if len(set(shown.values())) == 1:
        return next(iter(shown.values()))
    return ", ".join(f"{preset} {value}" for preset, value in shown.items())


def _method_default(name: str) -> str:
    """`[default: deqa's; grpo the recipe's]` of an optimizer option."""
    return f"[default: {_number(OPTIM_DEFAULTS[name])}; grpo {_recipes(name)}]"


def _model_help() -> str:
    bases = ", ".join(dict.fromkeys(r.model for r in GRPO_RECIPES.values()))
    return f"Model to fine-tune: Hugging Face repo id or directory [default: {DEFAULT_TRAIN_MODEL}; grpo {bases}]."


@dataclass
class DataConfig:
    """What to train on and how the conversations look."""

    panel: ClassVar[str] = "Data"
    datasets: list[str] = option(
        help="Comma-separated prepared datasets: names in the data dir or .parquet paths.",
        metavar="NAMES",
        required=True,
        default_factory=list,
    )
    data_dir: Path | None = option(
        None, "Data directory [default: $IQA_DATA_DIR or ./iqa-data].", metavar="DIR", control=True
    )
    images: Path | None = option(
        None, "Image root [default: the one each meta records; metas prepared without --images need it].",
        metavar="DIR", control=True,
    )  # fmt: skip
    repeats: list[int] | None = option(
        None,
        "Comma-separated integer repeat counts, one per dataset [default: 1 each].",
        flag="data_weights",
        metavar="N,N,...",
    )
    layout: str = option(
        "reference",
        "reference: train image-first as the released models; scoring: the scoring prompt's.",
        metavar="LAYOUT",
        completion="layouts",
    )
    fixed_question: bool = option(False, "Always ask the scoring question instead of one of ten phrasings.")
    # Video datasets' sampling, as `iqa score`'s (None: its default; unset in runs from before videos)
    fps: float | None = option(None, "Videos: frames per second of video [default: 1, unless --frames].", metavar="F")
    frames: int | None = option(None, "Videos: N frames spread uniformly instead [default: off: --fps].", metavar="N")
    max_frames: int | None = option(None, "Videos: at most N frames with --fps [default: 32].", metavar="N")

    def sampling(self) -> Any:
        """How video rows are sampled (`iqa_cli.video.Sampling`), as `iqa score` samples them with these flags."""
        from iqa_cli.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, Sampling

        if self.fps is not None and self.frames is not None:
            raise UserError(f"--fps {self.fps:g} and --frames {self.frames}: sample videos one way, not both")
        for flag, value in (("--fps", self.fps), ("--frames", self.frames), ("--max-frames", self.max_frames)):
            if value is not None and not value > 0:
                raise UserError(f"{flag} {value}: use a positive number")
        cap = self.max_frames or DEFAULT_MAX_FRAMES
        if self.frames is not None:
            return Sampling(fps=None, frames=self.frames, max_frames=cap)
        return Sampling(fps=self.fps or DEFAULT_FPS, max_frames=cap)


@dataclass
class ModelConfig:
    """The model to fine-tune and which of its parts train."""

    panel: ClassVar[str] = "Model"
    name: str | None = option(None, _model_help(), flag="model", metavar="MODEL")
    base: str | None = option(
        None, "Base model when --model is a LoRA adapter [default: the one the adapter names].", metavar="MODEL"
    )
    gradient_checkpointing: bool = option(
        True,
        "Keep the activations instead of recomputing them in backward: faster, needs more memory [default: off: "
        "gradient checkpointing on].",
        switch="--no-gradient-checkpointing",
    )
    freeze_vision: bool = option(False, "Do not train the vision encoder.")
    freeze_abstractor: bool = option(False, "Do not train the visual abstractor.")
    mlp_dims: list[int] = option(
        help="qscorer: hidden sizes of the regressor MLP.", metavar="N,N", default_factory=lambda: [*DEFAULT_MLP_DIMS]
    )
    # the model family's own options by name (`iqa_cli.model_options`: Qwen-VL's min_pixels, max_pixels); unset: None
    options: dict[str, Any] = option(flag="family_options", cli=False, default_factory=dict)


@dataclass
class OptimizerConfig:
    """AdamW, cosine with warmup, the batch and the seed."""

    panel: ClassVar[str] = "Optimization"
    epochs: int | None = option(None, f"Passes over the training rows {_method_default('epochs')}.", metavar="N")
    max_steps: int = option(0, "Stop after N optimizer steps (the LR schedule ends there); 0: all epochs.", metavar="N")
    batch_size: int = option(
        64,
        "Samples per optimizer step over all ranks (a DeQA-Score sample is an image pair; a grpo sample an image, "
        "answered --num-generations times).",
        metavar="N",
    )
    grad_accum: int = option(1, "Micro batches accumulated per optimizer step.", metavar="N")
    lr: float | None = option(
        None, f"Peak learning rate (AdamW; cosine decay, grpo linear) {_method_default('lr')}.",
        metavar="LR",
    )  # fmt: skip
    weight_decay: float = option(0.0, "AdamW weight decay (none on biases/norms).", metavar="X")
    warmup_ratio: float | None = option(
        None, f"Fraction of steps of linear warmup {_method_default('warmup_ratio')}.", metavar="X"
    )
    max_grad_norm: float = option(
        1.0, "Gradient clipping norm (HF Trainer's default, which the reference ran with); 0: off.", metavar="X"
    )
    seed: int = option(42, "Seed of order, pairs, questions and initializations.", metavar="N")
    strategy: str = option(
        "auto", "Under torchrun: auto (ddp for --lora, else fsdp), ddp, fsdp.", metavar="STRATEGY",
        completion="strategies",
    )  # fmt: skip


@dataclass
class LoRAConfig:
    """LoRA adapters on the language model instead of training all its weights."""

    panel: ClassVar[str] = "LoRA"
    enabled: bool = option(False, "Train LoRA adapters on the LLM instead of all its weights.", flag="lora")
    r: int = option(128, "LoRA rank.", flag="lora_r", metavar="N")
    alpha: float = option(256.0, "LoRA alpha (scale alpha / r).", flag="lora_alpha", metavar="X")
    dropout: float = option(0.05, "Dropout on the LoRA input.", flag="lora_dropout", metavar="P")
    targets: list[str] | None = option(None, _lora_targets_help(), flag="lora_targets", metavar="NAMES")


@dataclass
class LossConfig:
    """Loss weights and variants (`iqa_cli.losses`); None: the method's default (`objectives`)."""

    panel: ClassVar[str] = "Loss"
    w_fid: float | None = option(None, "Fidelity loss weight [default: deqa 1, qscorer 0].", metavar="W")
    w_tok: float | None = option(
        None, "Weight of the token losses (CE + KL) [default: deqa/qscorer 0.05, qalign 1].", metavar="W"
    )
    w_kl: float | None = option(None, "Soft-label KL weight, relative to CE [default: deqa 1, qscorer 0].", metavar="W")
    w_in_level: float = option(0.0, "DeQA-Score's optional in-level loss weight.", metavar="W")
    fid_std: str = option(
        "fixed", "Predicted std in the fidelity loss: fixed (1, the reference's) or predicted (the paper's).",
        metavar="MODE",
    )  # fmt: skip
    detach_pred_std: bool = option(
        True, "No gradient through a predicted std.", switch="--detach-pred-std/--no-detach-pred-std"
    )
    closed_set: bool = option(
        True, "Level softmax over the K levels (closed) or the vocabulary (open).", switch="--closed-set/--open-set"
    )
    w_mse: float = option(1.0, "qscorer: regression MSE weight (relative to CE).", metavar="W")
    mse_clamp: bool = option(
        True, "qscorer: clamp the regressor to [0, 5] in the MSE (reference).", switch="--mse-clamp/--no-mse-clamp"
    )
    w_nin: float = option(0.0, "qscorer: norm-in-norm loss weight (paper: 0.5).", metavar="W")
    w_rank: float = option(0.0, "qscorer: pairwise ranking loss weight.", metavar="W")
    rank_margin: float = option(0.0, "qscorer: margin of the ranking loss.", metavar="X")


@dataclass
class GRPOConfig:
    """--method grpo: the reasoning prompt, the rewards and the sampling (None: the --prompt-preset recipe's)."""

    panel: ClassVar[str] = "GRPO"
    preset: str | None = option(
        None, f"The conversation and answer rule: {', '.join(PRESETS)} [default: {DEFAULT_GRPO_PRESET}]; also the "
        "recipe of the defaults below.", flag="prompt_preset", metavar="PRESET",
        completion="reasoning_presets",
    )  # fmt: skip
    reward: str | None = option(
        None, "threshold (Q-Insight: 1 when |answer - MOS| < --reward-threshold) or fidelity (VisualQuality-R1: "
        "Thurstone fidelity of each answer against the other images of the batch) [default: the preset's].",
        metavar="REWARD",
    )  # fmt: skip
    threshold: float | None = option(
        None, f"threshold reward: the largest |answer - MOS| (MOS on 1-5) that earns 1 [default: "
        f"{_number(GRPO_DEFAULTS['threshold'])}].",
        flag="reward_threshold", metavar="X",
    )  # fmt: skip
    w_reward: float | None = option(
        None, f"Weight of the score reward [default: {_number(GRPO_DEFAULTS['w_reward'])}].", metavar="W"
    )
    w_format: float | None = option(
        None, "Weight of the format reward (the preset's answer shape) [default: "
        f"{_number(GRPO_DEFAULTS['w_format'])}].", metavar="W",
    )  # fmt: skip
    num_generations: int | None = option(
        None, f"Answers sampled per image (the group) [default: {_recipes('num_generations')}].", metavar="G"
    )
    beta: float | None = option(
        None, f"KL coefficient against the initial model [default: {_recipes('beta')}].", metavar="X"
    )
    max_completion_length: int | None = option(
        None, f"Most tokens per sampled answer [default: {_recipes('max_completion_length')}].", metavar="N"
    )
    temperature: float | None = option(
        None, f"Sampling temperature [default: {_number(GRPO_DEFAULTS['temperature'])}].", metavar="T"
    )
    top_k: int | None = option(
        None, f"Sample among the K likeliest tokens; 0: all [default: {GRPO_DEFAULTS['top_k']}, transformers' default "
        "the recipes ran with].", metavar="K",
    )  # fmt: skip

    def resolve(self) -> None:
        """Fills in the recipe's values (a --method grpo run records what it used)."""
        self.preset = self.preset or DEFAULT_GRPO_PRESET
        recipe = self.recipe
        defaults = {
            **GRPO_DEFAULTS, "reward": recipe.reward, "num_generations": recipe.num_generations, "beta": recipe.beta,
            "max_completion_length": recipe.max_completion_length,
        }  # fmt: skip
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def recipe(self) -> GRPORecipe:
        """The preset's recipe (an unknown preset, which `validate` refuses, reads VisualQuality-R1's meanwhile)."""
        return GRPO_RECIPES.get(self.preset or "", GRPO_RECIPES[DEFAULT_GRPO_PRESET])


@dataclass
class EvalConfig:
    """In-loop evaluation on the metas' test split."""

    panel: ClassVar[str] = "Evaluation"
    every: int = option(
        0, "Evaluate on the test split every N steps; 0: at the end only.", flag="eval_every", metavar="N",
        control=True,
    )  # fmt: skip
    enabled: bool = option(
        True, "Evaluate on the test split at the end.", flag="evaluate", switch="--eval/--no-eval", control=True
    )
    batch_size: int = option(
        16, "Images per evaluation batch (per rank).", flag="eval_batch_size", metavar="N", control=True
    )


@dataclass
class CheckpointConfig:
    """When resumable checkpoints are written and what stays at the end."""

    panel: ClassVar[str] = "Checkpoints"
    every: int = option(
        0,
        "Checkpoint every N steps; 0: only at each epoch end (and by --save-minutes).",
        flag="save_every",
        metavar="N",
        control=True,
    )
    minutes: float = option(
        30.0, "Also checkpoint when this many minutes passed since the last one; 0: off.", flag="save_minutes",
        metavar="MINUTES", control=True,
    )  # fmt: skip
    keep: bool = option(False, "Keep the last checkpoint when done.", flag="keep_checkpoints", control=True)
    merge: bool = option(False, "--lora: also write OUT/merged, a full checkpoint.", control=True)


@dataclass
class ControlConfig:
    """How this invocation runs; none of it changes what is trained."""

    panel: ClassVar[str] = "Run"
    device: str = option("auto", "auto, cpu, cuda or cuda:N.", metavar="DEVICE", control=True, completion="devices")
    workers: int | None = option(
        None,
        f"Image decoding processes per rank [default: the rank's share of the cores less one, at most "
        f"{MAX_WORKERS}; grpo 0: images decode in the training process].",
        metavar="N",
        control=True,
    )
    resume: bool = option(False, "Require resuming an interrupted run in OUT.", control=True)
    overwrite: bool = option(False, "Discard a run in OUT and start over.", control=True)
    wait: bool = option(False, "If another run trains into the same --out, wait for it to end.", control=True)
    quiet: bool = option(False, "No progress or per-step messages.", alias="-q", control=True)


SECTIONS = ("data", "model", "optim", "lora", "loss", "grpo", "eval", "checkpoint", "control")


@dataclass
class TrainConfig:
    """Everything `iqa train` needs."""

    panel: ClassVar[str] = "Run"
    out: Path = option(
        help="Run directory: checkpoints, log, then the final model.", metavar="DIR", required=True, alias="-o",
        control=True,
    )  # fmt: skip
    method: str = option(
        "deqa", "deqa (soft labels + fidelity), qalign, qscorer, or grpo (a reasoning model, through TRL).",
        metavar="METHOD", completion="methods",
    )  # fmt: skip
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    control: ControlConfig = field(default_factory=ControlConfig)

    def __post_init__(self) -> None:
        """The method's defaults where the options left None (the record then holds the values used)."""
        grpo = self.method == GRPO
        if grpo:
            self.grpo.resolve()
        recipe = self.grpo.recipe if grpo else None
        if self.model.name is None:
            self.model.name = recipe.model if recipe else DEFAULT_TRAIN_MODEL
        method_defaults = {k: getattr(recipe, k) for k in OPTIM_DEFAULTS} if recipe else OPTIM_DEFAULTS
        for name, value in method_defaults.items():
            if getattr(self.optim, name) is None:
                setattr(self.optim, name, value)

    @classmethod
    def from_options(cls, **options: Any) -> TrainConfig:
        """The nested config from flat option names (`lora_r=4`, `eval_every=8`); unset options keep defaults.
        A model family's own options (`min_pixels`) go to `model.options`."""
        family = {o.name: options.pop(o.name) for o in family_options() if o.name in options}
        sections = {}
        for name in SECTIONS:
            kind = cls.__dataclass_fields__[name].default_factory
            values = {f.name: options.pop(_flag(f)) for f in dataclasses.fields(kind) if _flag(f) in options}
            sections[name] = kind(**values)
        sections["model"].options = {**sections["model"].options, **family}
        top = {name: options.pop(name) for name in ("out", "method") if name in options}
        if options:
            raise TypeError(f"unknown training option(s): {', '.join(sorted(options))}")
        return cls(**top, **sections)

    def to_json(self) -> dict[str, Any]:
        """The flat record of the run (option name -> value, paths as strings), as runs were always recorded."""
        flat = {"out": self.out, "method": self.method}
        for name in SECTIONS:
            section = getattr(self, name)
            flat.update({_flag(f): getattr(section, f.name) for f in dataclasses.fields(section)})
        options = flat.pop("family_options")  # recorded flat, every family option (None: unset), as they always were
        flat.update({o.name: options.get(o.name) for o in family_options()})
        return {k: str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v) for k, v in flat.items()}

    def weights(self) -> dict[str, float]:
        """w_fid, w_tok and w_kl with the method's defaults filled in (none for grpo, which has no such losses)."""
        from iqa_cli.training.objectives import OBJECTIVES

        if self.method not in OBJECTIVES:
            return {}
        defaults = OBJECTIVES[self.method].default_weights
        given = {k: getattr(self.loss, k) for k in defaults}
        return {k: float(given[k] if given[k] is not None else v) for k, v in defaults.items()}

    @property
    def paired(self) -> bool:
        """DeQA-Score forwards (A, B) pairs for its fidelity term; without that term single images suffice."""
        from iqa_cli.training.objectives import OBJECTIVES

        return self.method in OBJECTIVES and OBJECTIVES[self.method].paired(self.weights())


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f.name


def _control_fields() -> frozenset[str]:
    names = {"out"}
    for name in SECTIONS:
        kind = TrainConfig.__dataclass_fields__[name].default_factory
        names |= {_flag(f) for f in dataclasses.fields(kind) if f.metadata.get("control")}
    return frozenset(names)


# Keys of the record that may change between an interrupted run and its resumption; `data_fingerprint` is no
# option: written at the start, checked against the metas on resume (`session.setup`).
RUN_CONTROL_FIELDS = _control_fields() | {"data_fingerprint"}


def validate(config: TrainConfig) -> None:
    """Checks every option before anything is loaded."""
    from iqa_cli.training.objectives import METHODS

    optim, lora, loss, data = config.optim, config.lora, config.loss, config.data
    data.sampling()  # --fps, --frames, --max-frames
    every = (config.eval.every, config.checkpoint.every, config.checkpoint.minutes)
    checks = [
        (config.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {config.method!r}"),
        (data.layout in LAYOUTS, f"--layout must be one of {', '.join(LAYOUTS)}, got {data.layout!r}"),
        (optim.strategy in STRATEGIES, f"--strategy must be one of {', '.join(STRATEGIES)}, got {optim.strategy!r}"),
        (loss.fid_std in ("fixed", "predicted"), f"--fid-std must be fixed or predicted, got {loss.fid_std!r}"),
        (optim.epochs >= 1, f"--epochs must be >= 1, got {optim.epochs}"),
        (optim.max_steps >= 0, f"--max-steps must be >= 0, got {optim.max_steps}"),
        (optim.lr > 0, f"--lr must be > 0, got {optim.lr}"),
        (0 <= optim.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {optim.warmup_ratio}"),
        (optim.weight_decay >= 0, f"--weight-decay must be >= 0, got {optim.weight_decay}"),
        (optim.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (0 = no clipping), got {optim.max_grad_norm}"),
        (lora.r >= 1, f"--lora-r must be >= 1, got {lora.r}"),
        (0 <= lora.dropout < 1, f"--lora-dropout must be in [0, 1), got {lora.dropout}"),
        (min(every) >= 0, "--eval-every, --save-every and --save-minutes must be >= 0"),
        (config.eval.batch_size >= 1, f"--eval-batch-size must be >= 1, got {config.eval.batch_size}"),
        (
            bool(config.model.mlp_dims) and min(config.model.mlp_dims) >= 1,
            f"--mlp-dims must be positive, got {config.model.mlp_dims}",
        ),
        (
            not (config.checkpoint.merge and not lora.enabled),
            "--merge applies to --lora runs (full tuning writes a full model)",
        ),
        (not (lora.enabled and optim.strategy == "fsdp"), "--lora trains with DDP (--strategy auto or ddp), not FSDP"),
        (not (config.control.resume and config.control.overwrite), "--resume and --overwrite exclude each other"),
        (
            config.control.workers is None or config.control.workers >= 0,
            f"--workers must be >= 0, got {config.control.workers}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    for name, value in config.weights().items():
        if value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    for name in ("w_in_level", "w_mse", "w_nin", "w_rank"):
        if getattr(loss, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(loss, name)}")
    if data.repeats is not None:
        if len(data.repeats) != len(data.datasets):
            raise UserError(f"--data-weights has {len(data.repeats)} value(s) for {len(data.datasets)} dataset(s)")
        if min(data.repeats) < 1:
            raise UserError(f"--data-weights must be integers >= 1 (repeat counts), got {data.repeats}")
    _validate_grpo(config)
    ModelSpec(family=dict(config.model.options)).check()  # the family's own rules (Qwen-VL: min <= max pixels)
    check_output_dir(Path(config.out), "--out")


def _validate_grpo(config: TrainConfig) -> None:
    """--method grpo's own options; for another method, none of them may be given."""
    import dataclasses
    import importlib.util

    grpo = config.grpo
    if config.method != GRPO:
        given = [f for f in dataclasses.fields(grpo) if getattr(grpo, f.name) is not None]
        if given:
            raise UserError(f"--{_flag(given[0]).replace('_', '-')} applies to --method grpo")
        return
    ignored = _other_methods_options(config)
    if ignored:
        raise UserError(f"--{ignored[0].replace('_', '-')} does not apply to --method grpo, which would ignore it")
    if importlib.util.find_spec("trl") is None:
        raise UserError("--method grpo trains through TRL, which is not installed: pip install 'iqa-cli[rl]'")
    checks = [
        (grpo.preset in PRESETS, f"--prompt-preset must be one of {', '.join(PRESETS)}, got {grpo.preset!r}"),
        (grpo.reward in REWARDS, f"--reward must be one of {', '.join(REWARDS)}, got {grpo.reward!r}"),
        (grpo.threshold > 0, f"--reward-threshold must be > 0, got {grpo.threshold}"),
        (min(grpo.w_reward, grpo.w_format) >= 0, "--w-reward and --w-format must be >= 0"),
        (grpo.w_reward + grpo.w_format > 0, "--w-reward and --w-format are both 0: nothing to learn from"),
        (grpo.num_generations >= 2, f"--num-generations must be >= 2 (a group), got {grpo.num_generations}"),
        (grpo.beta >= 0, f"--beta must be >= 0, got {grpo.beta}"),
        (grpo.max_completion_length >= 1, f"--max-completion-length must be >= 1, got {grpo.max_completion_length}"),
        (grpo.temperature > 0, f"--temperature must be > 0, got {grpo.temperature}"),
        (grpo.top_k >= 0, f"--top-k must be >= 0 (0: off), got {grpo.top_k}"),
        (config.optim.strategy != "fsdp", "--method grpo trains as TRL does under torchrun (DDP), not --strategy fsdp"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def _other_methods_options(config: TrainConfig) -> list[str]:
    """The options of the other methods' prompts, losses and regressor (and of video sampling: GRPO trains on
    images) that this config sets to something other than their defaults: GRPO would not use them."""
    data = DataConfig()
    changed = [
        f
        for f in ("layout", "fixed_question", "fps", "frames", "max_frames")
        if getattr(config.data, f) != getattr(data, f)
    ]
    if list(config.model.mlp_dims) != list(DEFAULT_MLP_DIMS):
        changed.append("mlp_dims")
    loss = LossConfig()
    changed += [_flag(f) for f in dataclasses.fields(loss) if getattr(config.loss, f.name) != getattr(loss, f.name)]
    return changed
