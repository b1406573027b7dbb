"""The configuration of an `iqa train` run: a few nested dataclasses, one comment per field.

Each field is one command-line option. Its option name (`--lora-r` -> `lora_r`) is the field name, or the
`flag` in its metadata where the section already says it (`lora.r`). `TrainConfig.from_options` builds the
nested config from those flat names (what the CLI parsed), and `to_json` writes them back flat: the record
in `train_config.json` and `iqa.json` keeps the key names runs have always been written with, so a run
directory from before the split still resumes or is recognised as complete.

Defaults are the reference runs' (`scripts/train.sh`, `train_lora.sh` of DeQA-Score and Q-Scorer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iqa_cli.errors import UserError
from iqa_cli.model_options import ModelSpec, family_options
from iqa_cli.models.backbone import family_package
from iqa_cli.paths import check_output_dir
from iqa_cli.training.objectives import METHODS, OBJECTIVES

LAYOUTS = ("reference", "scoring")  # image first (what the released models trained on) | the scoring prompt's
STRATEGIES = ("auto", "ddp", "fsdp")
DEFAULT_TRAIN_MODEL = family_package().DEFAULT_TRAIN_MODEL  # the default family's base model
DEFAULT_MLP_DIMS = (2048, 1024)


def _meta(flag: str | None = None, control: bool = False) -> dict[str, Any]:
    """Field metadata: the option name when it is not the field name; `control`: may change when a run resumes."""
    return {"flag": flag, "control": control}


CONTROL = _meta(control=True)


@dataclass
class DataConfig:
    """What to train on and how the conversations look."""

    datasets: list[str] = field(default_factory=list)  # prepared metas: names in data_dir or .parquet paths
    data_dir: Path | None = field(default=None, metadata=CONTROL)  # None: $IQA_DATA_DIR or ./iqa-data
    images: Path | None = field(default=None, metadata=CONTROL)  # image root for metas prepared without --images
    # repeat count per dataset; None: 1 each
    repeats: list[int] | None = field(default=None, metadata=_meta("data_weights"))
    layout: str = "reference"  # reference: image first, as the released models; scoring: the scoring prompt's
    fixed_question: bool = False  # always the scoring question instead of one of the ten phrasings


@dataclass
class ModelConfig:
    """The model to fine-tune and which of its parts train."""

    name: str = field(default=DEFAULT_TRAIN_MODEL, metadata=_meta("model"))  # Hugging Face repo id or directory
    base: str | None = None  # base of a LoRA checkpoint given as --model
    gradient_checkpointing: bool = True  # recompute activations in backward
    freeze_vision: bool = False  # keep the vision encoder as it is
    freeze_abstractor: bool = False  # keep the visual abstractor as it is
    mlp_dims: list[int] = field(default_factory=lambda: list(DEFAULT_MLP_DIMS))  # Q-Scorer regressor
    # the model family's own options by name (`iqa_cli.model_options`: Qwen-VL's min_pixels, max_pixels); unset: None
    options: dict[str, Any] = field(default_factory=dict, metadata=_meta("family_options"))


@dataclass
class OptimizerConfig:
    """AdamW, cosine with warmup, the batch and the seed."""

    epochs: int = 3  # passes over the training rows
    max_steps: int = 0  # stop after this many optimizer steps (the schedule ends there); 0 = all epochs
    batch_size: int = 64  # global samples per optimizer step (a DeQA-Score sample is a pair of images)
    grad_accum: int = 1  # micro batches per optimizer step
    lr: float = 2e-5  # peak learning rate
    weight_decay: float = 0.0  # AdamW's, on matrices only (none on biases and norms)
    warmup_ratio: float = 0.03  # fraction of the steps of linear warmup
    max_grad_norm: float = 1.0  # gradient clipping (HF Trainer's default, which the reference ran with); 0 = off
    seed: int = 42  # order, pairs, questions and initializations (HF Trainer's default seed)
    strategy: str = "auto"  # under torchrun: auto (ddp for LoRA, else fsdp), ddp or fsdp


@dataclass
class LoRAConfig:
    """LoRA adapters on the language model instead of training all its weights."""

    enabled: bool = field(default=False, metadata=_meta("lora"))
    r: int = field(default=128, metadata=_meta("lora_r"))  # rank
    alpha: float = field(default=256.0, metadata=_meta("lora_alpha"))  # scale alpha / r
    dropout: float = field(default=0.05, metadata=_meta("lora_dropout"))  # on the LoRA input
    # module-name suffixes; None: the reference's
    targets: list[str] | None = field(default=None, metadata=_meta("lora_targets"))


@dataclass
class LossConfig:
    """Loss weights and variants (`iqa_cli.losses`); None: the method's default (`objectives`)."""

    w_fid: float | None = None  # fidelity (DeQA-Score's pair loss)
    w_tok: float | None = None  # the token losses (CE + KL)
    w_kl: float | None = None  # soft-label KL, relative to CE
    w_in_level: float = 0.0  # DeQA-Score's optional in-level loss
    fid_std: str = "fixed"  # predicted std in the fidelity loss: "fixed" (1, reference default) | "predicted" (paper)
    detach_pred_std: bool = True  # no gradient through a predicted std
    closed_set: bool = True  # level softmax over the K levels (closed) or the vocabulary (open)
    w_mse: float = 1.0  # Q-Scorer: regression MSE, relative to CE
    mse_clamp: bool = True  # Q-Scorer: the reference clamps the regressor output to [0, 5] inside the MSE
    w_nin: float = 0.0  # Q-Scorer: norm-in-norm loss (paper: 0.5)
    w_rank: float = 0.0  # Q-Scorer: pairwise ranking loss
    rank_margin: float = 0.0  # Q-Scorer: margin of the ranking loss


@dataclass
class EvalConfig:
    """In-loop evaluation on the metas' test split."""

    every: int = field(default=0, metadata=_meta("eval_every", control=True))  # optimizer steps; 0 = only at the end
    enabled: bool = field(default=True, metadata=_meta("evaluate", control=True))  # evaluate at the end
    batch_size: int = field(default=16, metadata=_meta("eval_batch_size", control=True))  # images per batch and rank


@dataclass
class CheckpointConfig:
    """When resumable checkpoints are written and what stays at the end."""

    # optimizer steps; 0 = at the end of each epoch only
    every: int = field(default=0, metadata=_meta("save_every", control=True))
    # also after this long since the last; 0 = off
    minutes: float = field(default=30.0, metadata=_meta("save_minutes", control=True))
    # keep the last checkpoint when done
    keep: bool = field(default=False, metadata=_meta("keep_checkpoints", control=True))
    merge: bool = field(default=False, metadata=CONTROL)  # LoRA: also write OUT/merged, a full checkpoint


@dataclass
class ControlConfig:
    """How this invocation runs; none of it changes what is trained."""

    device: str = field(default="auto", metadata=CONTROL)  # auto, cpu, cuda or cuda:N
    workers: int | None = field(default=None, metadata=CONTROL)  # image decoding processes per rank; None: cores - 1
    resume: bool = field(default=False, metadata=CONTROL)  # require resuming an interrupted run
    overwrite: bool = field(default=False, metadata=CONTROL)  # discard a run in --out and start over
    # another run on the same --out: wait for it instead of refusing
    wait: bool = field(default=False, metadata=CONTROL)
    quiet: bool = field(default=False, metadata=CONTROL)  # no progress or per-step messages


SECTIONS = ("data", "model", "optim", "lora", "loss", "eval", "checkpoint", "control")


@dataclass
class TrainConfig:
    """Everything `iqa train` needs."""

    out: Path = field(metadata=CONTROL)  # the run directory: checkpoints, log, then the final model
    method: str = "deqa"  # the objective: deqa, qalign or qscorer (`objectives`)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    control: ControlConfig = field(default_factory=ControlConfig)

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
        """w_fid, w_tok and w_kl with the method's defaults filled in."""
        defaults = OBJECTIVES[self.method].default_weights
        given = {k: getattr(self.loss, k) for k in defaults}
        return {k: float(given[k] if given[k] is not None else v) for k, v in defaults.items()}

    @property
    def paired(self) -> bool:
        """DeQA-Score forwards (A, B) pairs for its fidelity term; without that term single images suffice."""
        return OBJECTIVES[self.method].paired(self.weights())


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
    optim, lora, loss, data = config.optim, config.lora, config.loss, config.data
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
    ModelSpec(family=dict(config.model.options)).check()  # the family's own rules (Qwen-VL: min <= max pixels)
    check_output_dir(Path(config.out), "--out")
