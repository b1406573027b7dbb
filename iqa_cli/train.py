"""`iqa train`: fine-tune mPLUG-Owl2 with the DeQA-Score, Q-Align or Q-Scorer objective.

setup -> train -> cleanup, as one function each:

- `setup` reads the prepared metas (`train_data`), loads the model (`models.checkpoints`), adds the Q-Scorer
  score tokens and regressor, picks the trainable parts (LoRA through peft, or full tuning; vision model and
  abstractor trainable unless frozen), wraps the model for the launch (one process, DDP for LoRA, FSDP2 for
  full tuning; `distributed`), builds AdamW + cosine-with-warmup, and restores a checkpoint of an
  interrupted run of the same configuration (`train_state`).
- `run_training` loops over epochs and optimizer steps (gradient accumulation, bf16 autocast on CUDA,
  gradient clipping at 1.0 as the reference's HF Trainer does), logs every step to JSONL, evaluates on the
  metas' test split, and saves resumable checkpoints.
- `finish` writes the checkpoint directory that `iqa score --model DIR` loads with no other flag.

Defaults are the reference runs' (`scripts/train.sh`, `train_lora.sh` of DeQA-Score and Q-Scorer): lr 2e-5,
cosine, warmup ratio 0.03, weight decay 0, 3 epochs, LoRA r 128 / alpha 256 / dropout 0.05 on `q_proj` and
`v_proj.multiway.1` of every LLM layer, vision model and abstractor trained, loss weights as in
`iqa_cli.losses`.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from iqa_cli import distributed, interrupts, run_lock, train_data, train_state
from iqa_cli.errors import UserError
from iqa_cli.losses import (
    QSCORER_CLAMP,
    LevelTargets,
    LossParts,
    deqa_loss,
    onehot_level_ce,
    qscorer_loss,
)
from iqa_cli.paths import check_output_dir, resolve_data_dir

METHODS = ("deqa", "qalign", "qscorer")
LAYOUTS = ("reference", "scoring")  # image first (what the released models trained on) | the scoring prompt's
STRATEGIES = ("auto", "ddp", "fsdp")
DEFAULT_TRAIN_MODEL = "MAGAer13/mplug-owl2-llama2-7b"
DEFAULT_MLP_DIMS = (2048, 1024)
# The reference's `find_all_lora_names`: every q_proj and the visual copy of v_proj in the LLM.
LORA_TARGET_SUFFIXES = ("self_attn.q_proj", "self_attn.v_proj.multiway.1")
SCORE_TOKEN = "<score{}>"

# Loss weights each method starts from (None in TrainConfig means "this default").
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "deqa": {"w_fid": 1.0, "w_tok": 0.05, "w_kl": 1.0},
    "qalign": {"w_fid": 0.0, "w_tok": 1.0, "w_kl": 0.0},
    "qscorer": {"w_fid": 0.0, "w_tok": 0.05, "w_kl": 0.0},
}


@dataclass
class TrainConfig:
    """Everything `iqa train` needs; names follow the command-line flags."""

    datasets: list[str]
    out: Path
    model: str = DEFAULT_TRAIN_MODEL
    base: str | None = None  # base of a LoRA checkpoint given as --model
    method: str = "deqa"
    data_dir: Path | None = None
    images: Path | None = None  # image root for metas prepared without --images
    data_weights: list[int] | None = None
    # optimization
    epochs: int = 3
    max_steps: int = 0  # stop after this many optimizer steps (the schedule ends there); 0 = all epochs
    batch_size: int = 64  # global samples per optimizer step (a DeQA-Score sample is a pair of images)
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0  # HF Trainer's default, which the reference ran with
    seed: int = 42  # HF Trainer's default seed
    gradient_checkpointing: bool = True
    # trainable parts
    lora: bool = False
    lora_r: int = 128
    lora_alpha: float = 256.0
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # module-name suffixes; None = the reference's
    freeze_vision: bool = False
    freeze_abstractor: bool = False
    # losses (None = the method's default, see METHOD_DEFAULTS)
    w_fid: float | None = None
    w_tok: float | None = None
    w_kl: float | None = None
    w_in_level: float = 0.0
    fid_std: str = "fixed"  # "fixed" (std 1, reference default) | "predicted" (paper)
    detach_pred_std: bool = True
    closed_set: bool = True
    w_mse: float = 1.0
    mse_clamp: bool = True  # the reference clamps the regressor output to [0, 5] inside the MSE
    w_nin: float = 0.0
    w_rank: float = 0.0
    rank_margin: float = 0.0
    mlp_dims: list[int] = field(default_factory=lambda: list(DEFAULT_MLP_DIMS))
    # prompts
    layout: str = "reference"
    fixed_question: bool = False
    # run control
    eval_every: int = 0  # optimizer steps; 0 = evaluate only at the end
    evaluate: bool = True
    eval_batch_size: int = 16
    save_every: int = 0  # optimizer steps; 0 = at the end of every epoch only
    save_minutes: float = 30.0  # also checkpoint when this long has passed since the last save; 0 = off
    keep_checkpoints: bool = False
    merge: bool = False
    strategy: str = "auto"
    device: str = "auto"
    workers: int | None = None
    resume: bool = False
    overwrite: bool = False
    wait: bool = False  # another run on the same --out: wait for it instead of refusing
    quiet: bool = False

    def weights(self) -> dict[str, float]:
        """Loss weights with the method's defaults filled in."""
        defaults = METHOD_DEFAULTS[self.method]
        return {k: float(getattr(self, k) if getattr(self, k) is not None else v) for k, v in defaults.items()}

    @property
    def paired(self) -> bool:
        """DeQA-Score forwards (A, B) pairs for its fidelity term; without that term single images suffice."""
        return self.method == "deqa" and self.weights()["w_fid"] > 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


# Fields that may change between an interrupted run and its resumption.
RUN_CONTROL_FIELDS = frozenset(
    {"out", "eval_every", "evaluate", "eval_batch_size", "save_every", "save_minutes", "keep_checkpoints", "merge",
     "device",
     "workers", "resume", "overwrite", "wait", "quiet", "data_dir", "images",
     "data_fingerprint"}  # not a flag: written at the start, checked against the metas on resume (`setup`)
)  # fmt: skip


def validate(config: TrainConfig) -> None:
    """Checks every flag before anything is loaded."""
    checks = [
        (config.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {config.method!r}"),
        (config.layout in LAYOUTS, f"--layout must be one of {', '.join(LAYOUTS)}, got {config.layout!r}"),
        (config.strategy in STRATEGIES, f"--strategy must be one of {', '.join(STRATEGIES)}, got {config.strategy!r}"),
        (config.fid_std in ("fixed", "predicted"), f"--fid-std must be fixed or predicted, got {config.fid_std!r}"),
        (config.epochs >= 1, f"--epochs must be >= 1, got {config.epochs}"),
        (config.max_steps >= 0, f"--max-steps must be >= 0, got {config.max_steps}"),
        (config.lr > 0, f"--lr must be > 0, got {config.lr}"),
        (0 <= config.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {config.warmup_ratio}"),
        (config.weight_decay >= 0, f"--weight-decay must be >= 0, got {config.weight_decay}"),
        (config.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (0 = no clipping), got {config.max_grad_norm}"),
        (config.lora_r >= 1, f"--lora-r must be >= 1, got {config.lora_r}"),
        (0 <= config.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {config.lora_dropout}"),
        (
            min(config.eval_every, config.save_every, config.save_minutes) >= 0,
            "--eval-every, --save-every and --save-minutes must be >= 0",
        ),
        (config.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {config.eval_batch_size}"),
        (bool(config.mlp_dims) and min(config.mlp_dims) >= 1, f"--mlp-dims must be positive, got {config.mlp_dims}"),
        (not (config.merge and not config.lora), "--merge applies to --lora runs (full tuning writes a full model)"),
        (not (config.lora and config.strategy == "fsdp"), "--lora trains with DDP (--strategy auto or ddp), not FSDP"),
        (not (config.resume and config.overwrite), "--resume and --overwrite exclude each other"),
        (config.workers is None or config.workers >= 0, f"--workers must be >= 0, got {config.workers}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    for name, value in config.weights().items():
        if value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    for name in ("w_in_level", "w_mse", "w_nin", "w_rank"):
        if getattr(config, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if config.data_weights is not None:
        if len(config.data_weights) != len(config.datasets):
            raise UserError(
                f"--data-weights has {len(config.data_weights)} value(s) for {len(config.datasets)} dataset(s)"
            )
        if min(config.data_weights) < 1:
            raise UserError(f"--data-weights must be integers >= 1 (repeat counts), got {config.data_weights}")
    check_output_dir(Path(config.out), "--out")


# --- math -----------------------------------------------------------------------------------------------------------


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine decay to 0 at `total`
    (transformers' `get_cosine_schedule_with_warmup`, which the reference's Trainer used)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps(total: int, ratio: float) -> int:
    """`ceil(total * ratio)`, as transformers' `TrainingArguments.get_warmup_steps`."""
    return math.ceil(total * ratio)


@dataclass(frozen=True)
class QAlignLoss(LossParts):
    cross_entropy: torch.Tensor  # whole response, one-hot level token included


@dataclass(frozen=True)
class LossSpec:
    """What `compute_loss` needs besides the model output."""

    method: str
    level_ids: tuple[int, ...]  # the K tokens the levels are read at, ascending
    weights: dict[str, float]
    fixed_std: bool
    detach_pred_std: bool
    closed_set: bool
    w_in_level: float
    w_mse: float
    w_nin: float
    w_rank: float
    margin: float
    mse_clamp: bool = True


def compute_loss(spec: LossSpec, logits: torch.Tensor, pred: torch.Tensor | None, batch) -> LossParts:
    """The method's loss on one micro batch; `logits` [N, T, V] are aligned with `batch.labels`."""
    w = spec.weights
    if spec.method == "deqa":
        n = batch.pairs

        def side(rows: slice) -> LevelTargets:
            return LevelTargets(
                labels=batch.labels[rows],
                level_pos=batch.level_pos[rows],
                soft_labels=batch.soft_labels[rows],
                mos=batch.mos[rows],
                std=batch.std[rows],
            )

        kwargs = dict(
            w_fid=w["w_fid"],
            w_tok=w["w_tok"],
            w_kl=w["w_kl"],
            w_in_level=spec.w_in_level,
            fixed_std=spec.fixed_std,
            detach_pred_std=spec.detach_pred_std,
            closed_set=spec.closed_set,
        )
        if n:
            a, b = slice(0, n), slice(n, 2 * n)
            return deqa_loss(logits[a], side(a), spec.level_ids, logits[b], side(b), **kwargs)
        return deqa_loss(logits, side(slice(None)), spec.level_ids, **kwargs)
    if spec.method == "qalign":
        ce = onehot_level_ce(logits, batch.labels)
        return QAlignLoss(total=w["w_tok"] * ce, cross_entropy=ce)
    assert pred is not None
    return qscorer_loss(
        logits,
        batch.labels,
        pred,
        batch.mos,
        score_token_ids=spec.level_ids,
        score_pos=batch.level_pos,
        soft_labels=batch.soft_labels,
        target_std=batch.std,
        groups=batch.group,
        w_tok=w["w_tok"],
        w_mse=spec.w_mse,
        w_kl=w["w_kl"],
        w_nin=spec.w_nin,
        w_rank=spec.w_rank,
        w_fid=w["w_fid"],
        margin=spec.margin,
        clamp=QSCORER_CLAMP if spec.mse_clamp else None,
    )


# --- the model seen by the optimizer --------------------------------------------------------------------------------


class TrainForward(nn.Module):
    """One forward pass for training: logits at the text positions and, for Q-Scorer, the regressor.

    Logits are computed only where text tokens landed in the expanded sequence (the 65 visual positions
    carry no labels), so `logits[:, t]` belongs to input token t and the losses' shift convention holds.
    The regressor reads the final-norm hidden state of the token just before the score token, the one
    that predicts it; scoring reads the same position (the last input id, `regressor="last"`).
    """

    def __init__(self, model: nn.Module, core: nn.Module):
        super().__init__()
        self.model = model  # the MPLUGOwl2ForCausalLM, or the peft model wrapping it
        object.__setattr__(self, "core", core)  # the MPLUGOwl2ForCausalLM itself, not registered twice

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor,
        regressor_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from iqa_cli.models.mplug_owl2.model import IMAGE_TOKEN_INDEX, expanded_positions, gather_rows

        t = input_ids.shape[1]
        slot = (input_ids == IMAGE_TOKEN_INDEX).long().argmax(1)
        text_pos = expanded_positions(slot, t, self.core.num_visual_tokens)  # N, T
        out = self.model(input_ids, pixel_values, attention_mask=attention_mask, logits_at=text_pos)
        pred = None
        if regressor_pos is not None:
            hidden = gather_rows(out.hidden_states, text_pos.gather(1, regressor_pos[:, None]))[:, 0]  # N, C
            pred = self.core.deepmlp(hidden)
        return out.logits, pred


# --- setup ----------------------------------------------------------------------------------------------------------


@dataclass
class Levels:
    """What the model is trained to say and how scoring reads it."""

    names: tuple[str, ...]  # ascending quality
    tokens: tuple[str, ...]  # text of the token each level is read at
    ids: tuple[int, ...]
    prompt: str  # scoring prompt text
    input_ids: tuple[int, ...]  # exact scoring ids (prompt + response pieces before the level token)
    regressor: str | None


@dataclass
class Session:
    """Everything a training run holds between setup and cleanup."""

    config: TrainConfig
    env: distributed.DistEnv
    device: torch.device
    data: train_data.TrainData
    core: nn.Module  # MPLUGOwl2ForCausalLM
    peft_model: nn.Module | None
    forward: nn.Module  # TrainForward, wrapped in DDP when distributed with LoRA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tokenizer: Any
    preprocessor: Any
    levels: Levels
    spec: LossSpec
    plan: train_data.BatchPlan
    encodings: dict
    pool: np.ndarray  # weighted train rows
    steps_per_epoch: int
    total_steps: int
    run: train_state.RunDirectory
    progress: train_state.Progress
    strategy: str  # "single" | "ddp" | "fsdp"
    base: str | None  # what the LoRA adapter applies to (repo id or absolute path)
    base_revision: str | None
    loaded_layout: str
    console: Any = None
    resumed_from: int | None = None
    autocast_dtype: torch.dtype | None = None
    log: Callable[[str], None] = print
    history: list[dict] = field(default_factory=list)


def _level_setup(config: TrainConfig, names: Sequence[str], tokenizer, core: nn.Module) -> Levels:
    """Level tokens (words, or added `<scoreK>` tokens with resized embeddings) and the scoring readout."""
    from iqa_cli.models.mplug_owl2.tokenizer import (
        DEFAULT_PROMPT,
        DEFAULT_QUESTION,
        EVAL_TEMPLATE,
        level_token_ids,
        tokenize_prompt,
    )

    k = len(names)
    if config.method == "qscorer":
        tokens = tuple(SCORE_TOKEN.format(i + 1) for i in range(k))
        ids = tuple(tokenizer.add_tokens(tokens, special=True))
        vocab = core.config.language.vocab_size
        if len(tokenizer) > vocab:  # new rows start as the mean of the others (the reference's resize)
            core.resize_token_embeddings(len(tokenizer))
    else:
        tokens = tuple(names)
        ids = tuple(level_token_ids(tokenizer, tokens))
    prompt = DEFAULT_PROMPT
    prefix = tokenize_prompt(tokenizer, prompt)
    scoring = train_data.encode_conversations(tokenizer, [DEFAULT_QUESTION], tokens, ids, EVAL_TEMPLATE)
    heads = {enc.input_ids[: enc.level_pos] for enc in scoring.values()}
    if len(heads) != 1:
        raise UserError(f"the level tokens {list(tokens)} are preceded by different response pieces")
    input_ids = heads.pop()
    if tuple(input_ids[: len(prefix)]) != tuple(prefix):
        raise UserError(f"the scoring prompt {prompt!r} does not tokenize as the start of the training response")
    return Levels(
        names=tuple(names),
        tokens=tokens,
        ids=ids,
        prompt=prompt,
        input_ids=tuple(input_ids),
        regressor="last" if config.method == "qscorer" else None,
    )


def _add_regressor(config: TrainConfig, core: nn.Module) -> None:
    """Q-Scorer's MLP, Kaiming-normal (fan_in, ReLU) weights and zero biases as the reference initializes it."""
    from iqa_cli.models.mplug_owl2.regressor import ScoreRegressor

    if core.deepmlp is not None:
        return
    dims = [int(d) for d in config.mlp_dims]
    weight = core.lm_head.weight
    mlp = ScoreRegressor(core.config.language.hidden_size, dims).to(device=weight.device, dtype=torch.float32)
    for module in mlp.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    core.deepmlp = mlp
    core.config.deepmlp_hidden_dims = dims


def lora_target_names(core: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Full names of the LLM Linear layers LoRA wraps (never inside the vision model or abstractor)."""
    names = [
        name
        for name, module in core.named_modules()
        if isinstance(module, nn.Linear)
        and name.startswith("model.layers.")
        and any(name == s or name.endswith("." + s) for s in suffixes)
    ]
    if not names:
        raise UserError(f"--lora-targets {list(suffixes)} match no linear layer of the language model")
    return names


def _apply_lora(config: TrainConfig, core: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = lora_target_names(core, config.lora_targets or LORA_TARGET_SUFFIXES)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
    )
    return get_peft_model(core, lora)


def _select_trainable(config: TrainConfig, core: nn.Module, lora: bool) -> None:
    """requires_grad as the reference sets it: LoRA weights (or the whole LLM), the vision model and the
    abstractor unless frozen; Q-Scorer also trains lm_head and the regressor in LoRA runs."""
    for name, p in core.named_parameters():
        p.requires_grad = ("lora_" in name) if lora else True
    if config.method == "qscorer":
        core.lm_head.weight.requires_grad = True
    if core.deepmlp is not None:  # trained by Q-Scorer; kept as it is (and unused) by the other methods
        for p in core.deepmlp.parameters():
            p.requires_grad = config.method == "qscorer"
    vision, abstractor = core.model.vision_model, core.model.visual_abstractor
    for p in vision.parameters():
        p.requires_grad = not config.freeze_vision
    for p in abstractor.parameters():
        p.requires_grad = not config.freeze_abstractor


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm gains (1-D tensors), as the reference's Trainer."""
    decay, plain = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else plain).append(p)
    if not decay and not plain:
        raise UserError("nothing to train: every parameter is frozen")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _default_workers(env: distributed.DistEnv) -> int:
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, env.local_world_size) - 1))


def setup(config: TrainConfig, decision: str = "fresh", console: Any = None, loaded: Any = None) -> Session:
    """Data, model, trainable parts, wrapping, optimizer, schedule; restores the checkpoint when `decision`
    is "resume". The process group (if any) is already initialized. `loaded` (a LoadedCheckpoint) replaces
    loading `config.model`, for benchmarks that build a full-size model with random weights in memory."""
    from iqa_cli.models.backbone import MPLUGOwl2Backbone
    from iqa_cli.models.mplug_owl2.checkpoints import load_mplug_owl2
    from iqa_cli.models.mplug_owl2.tokenizer import DEFAULT_QUESTION, EVAL_TEMPLATE, QUESTIONS, TRAIN_TEMPLATE

    env = distributed.env()
    device = distributed.resolve_device(config.device, env)
    strategy = "single"
    if env.is_distributed:
        strategy = config.strategy if config.strategy != "auto" else ("ddp" if config.lora else "fsdp")
    elif config.strategy == "fsdp":  # FSDP2 in one process (a group of one rank): benchmarks, tests
        strategy = "fsdp"
        distributed.init_single_process(device)
    plan = train_data.BatchPlan(config.batch_size, env.world_size, config.grad_accum)
    run = train_state.RunDirectory(Path(config.out))
    questions = (DEFAULT_QUESTION,) if config.fixed_question else QUESTIONS
    data = train_data.load_train_data(
        config.datasets,
        resolve_data_dir(config.data_dir),
        images=config.images,
        seed=config.seed,
        num_questions=len(questions),
    )
    if decision == "resume":
        _check_same_data(run, data)
    pool = train_data.weighted_rows(data.train.group, config.data_weights or [1] * len(data.metas))
    steps_per_epoch = plan.steps_per_epoch(len(pool))
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {config.batch_size} is larger than the {len(pool)} training samples")
    torch.manual_seed(config.seed)  # the Q-Scorer MLP and LoRA initializations (the same on every rank)
    if loaded is None:
        loaded = load_mplug_owl2(config.model, base=config.base, dtype=torch.float32, device=device)
    if config.lora and loaded.layout != "full":
        raise UserError(f"--model {config.model} is a LoRA adapter; train a LoRA on a full model (merge it first)")
    backbone = MPLUGOwl2Backbone.from_checkpoint(loaded)
    core, tokenizer, preprocessor = loaded.model, backbone.tokenizer, backbone.preprocessor
    if config.method == "qscorer":
        _add_regressor(config, core)
    levels = _level_setup(config, data.level_names, tokenizer, core)
    if config.method == "qscorer":
        core.config.score_token_id = list(reversed(levels.ids))  # the reference stores <scoreK> first
    template = TRAIN_TEMPLATE if config.layout == "reference" else EVAL_TEMPLATE
    encodings = train_data.encode_conversations(tokenizer, questions, levels.tokens, levels.ids, template)
    vocab = core.config.language.vocab_size
    largest = max(max(enc.input_ids) for enc in encodings.values())
    if largest >= vocab:
        raise UserError(f"{config.model}: the tokenizer gives id {largest} but the model has {vocab} embedding rows")

    core.train()
    if config.gradient_checkpointing:
        core.set_gradient_checkpointing(True)
    peft_model = _apply_lora(config, core) if config.lora else None
    _select_trainable(config, core, lora=config.lora)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    if autocast_dtype is not None and config.lora:  # frozen weights in bf16 (the reference casts the model)
        for p in core.parameters():
            if not p.requires_grad:
                p.data = p.data.to(autocast_dtype)
    forward = TrainForward(peft_model if peft_model is not None else core, core)
    if strategy == "ddp":
        forward = distributed.wrap_ddp(forward, device)
    elif strategy == "fsdp":
        distributed.shard_mplug_owl2(core, device, mixed_precision=autocast_dtype)
        # The decoder layers also return their (unused) key/value views; nothing modifies them in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")

    optimizer = torch.optim.AdamW(
        _param_groups(forward, config.weight_decay), lr=config.lr, betas=(0.9, 0.999), eps=1e-8
    )
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    warm = warmup_steps(total, config.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warm))
    weights = config.weights()
    spec = LossSpec(
        method=config.method,
        level_ids=levels.ids,
        weights=weights,
        fixed_std=config.fid_std == "fixed",
        detach_pred_std=config.detach_pred_std,
        closed_set=config.closed_set,
        w_in_level=config.w_in_level,
        w_mse=config.w_mse,
        w_nin=config.w_nin,
        w_rank=config.w_rank,
        margin=config.rank_margin,
        mse_clamp=config.mse_clamp,
    )
    base = None
    if config.lora:
        base = loaded.repo_id or str(loaded.weights_dir.resolve())
    session = Session(
        config=config,
        env=env,
        device=device,
        data=data,
        core=core,
        peft_model=peft_model,
        forward=forward,
        optimizer=optimizer,
        scheduler=scheduler,
        tokenizer=tokenizer,
        preprocessor=preprocessor,
        levels=levels,
        spec=spec,
        plan=plan,
        encodings=encodings,
        pool=pool,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        run=run,
        progress=train_state.Progress(),
        strategy=strategy,
        base=base,
        base_revision=loaded.revision if config.lora else None,
        loaded_layout=loaded.layout,
        console=console,
        autocast_dtype=autocast_dtype,
    )
    session.log = _logger(session)
    if decision == "resume":
        session.progress = train_state.load_checkpoint(run, forward, optimizer, scheduler)
        session.resumed_from = session.progress.global_step
        if env.is_main:
            run.truncate_log(session.progress.global_step)
            session.log(f"resuming {run.out} from step {session.progress.global_step} of {total}")
    elif env.is_main:
        run.start({**config.to_json(), "data_fingerprint": data.fingerprint})
    distributed.barrier()
    return session


def _check_same_data(run: train_state.RunDirectory, data: train_data.TrainData) -> None:
    """A resumed run continues the sampler where it stopped, which only means something on the same rows."""
    saved = (run.read_config() or {}).get("data_fingerprint")
    if saved and saved != data.fingerprint:
        metas = ", ".join(str(m.path) for m in data.metas)
        raise UserError(
            f"{run.out} was trained on other data: {metas} changed since the run started (prepared again?); "
            "use another --out, or --overwrite to start over"
        )


def _logger(session: Session) -> Callable[[str], None]:
    def log(message: str) -> None:
        if session.env.is_main and not session.config.quiet:
            if session.console is not None:
                session.console.print(message, markup=False, soft_wrap=True)
            else:
                import sys

                print(message, file=sys.stderr)

    return log


# --- the loop -------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out: Path
    method: str
    steps: int  # optimizer steps done in total
    steps_this_run: int
    seconds: float
    samples_per_second: float  # samples (pairs for DeQA-Score) per second over all ranks
    images_per_second: float
    resumed_from: int | None
    already_complete: bool = False
    final_eval: dict | None = None
    merged: Path | None = None
    is_main: bool = True
    skipped_images: list[str] = field(default_factory=list)


class TrainInterrupted(interrupts.Interrupted):
    """SIGINT/SIGTERM stopped the run; its last checkpoint stays, and the same command resumes from it."""

    def __init__(self, signum: int, run: train_state.RunDirectory, is_main: bool = True):
        super().__init__(signum)
        self.is_main = is_main
        name = signal.Signals(signum).name
        checkpoint = run.latest_checkpoint()
        if checkpoint is None:
            self.message = (
                f"interrupted by {name} before the first checkpoint of {run.out}; run the same command to start "
                "again (--save-every N saves every N steps)"
            )
        else:
            step = int(checkpoint.name.split("-")[1])
            self.message = (
                f"interrupted by {name}; the last checkpoint is {checkpoint} (step {step}); run the same command "
                "to resume from it"
            )

    def __str__(self) -> str:
        return self.message


def _autocast(session: Session):
    if session.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(session.device.type, dtype=session.autocast_dtype)


def _loader(session: Session, epoch: int, start_step: int):
    from torch.utils.data import DataLoader

    config = session.config
    order = train_data.epoch_order(session.pool, config.seed, epoch)
    partners = train_data.draw_partners(order, session.data.train.group, config.seed, epoch) if config.paired else None
    sampler = train_data.EpochSampler(order, partners, session.plan, session.env.rank, start_step)
    dataset = train_data.TrainImages(
        session.data.train, session.encodings, session.preprocessor, session.data.train.level
    )
    collate = train_data.Collate(session.tokenizer.pad_id, session.data.train, config.paired)
    workers = config.workers if config.workers is not None else _default_workers(session.env)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=session.device.type == "cuda",
        # A private generator: creating the iterator must not draw from the global RNG (resume equality).
        generator=torch.Generator().manual_seed(config.seed + epoch),
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )


def _micro_step(session: Session, batch: train_data.TrainBatch, scale: float) -> LossParts:
    batch = batch.to(session.device)
    reg_pos = batch.level_pos - 1 if session.config.method == "qscorer" else None
    with _autocast(session):
        logits, pred = session.forward(batch.input_ids, batch.pixel_values, batch.attention_mask, reg_pos)
    parts = compute_loss(session.spec, logits, pred, batch)
    (parts.total * scale).backward()
    return parts


def run_training(session: Session) -> TrainResult:
    """The epochs: micro batches, optimizer steps, logging, evaluation and checkpoints."""
    config, plan, progress = session.config, session.plan, session.progress
    forward, optimizer, scheduler = session.forward, session.optimizer, session.scheduler
    images_per_sample = 2 if config.paired else 1
    start_step = progress.global_step
    started = last_save = time.perf_counter()
    skipped: list[str] = []
    bar = _progress_bar(session)
    params = [p for p in forward.parameters() if p.requires_grad]
    try:
        while progress.epoch < config.epochs and progress.global_step < session.total_steps:
            loader = _loader(session, progress.epoch, progress.step)
            batches = iter(loader)
            while progress.step < session.steps_per_epoch:
                step_start = time.perf_counter()
                sums: dict[str, float] = {}
                for a in range(plan.accumulation):
                    batch = next(batches)
                    if batch is None:
                        raise UserError("every image of a training batch failed to decode; check the image files")
                    for reason in batch.skipped:
                        skipped.append(reason)
                        session.log(f"warning: skipped an image that cannot be decoded: {reason}")
                    last = a == plan.accumulation - 1
                    with distributed.grad_sync(forward, enabled=last):
                        parts = _micro_step(session, batch, 1.0 / plan.accumulation)
                    for key, value in parts.log_dict().items():
                        sums[key] = sums.get(key, 0.0) + value / plan.accumulation
                grad_norm = distributed.clip_grad_norm(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.advance(session.steps_per_epoch)
                record = _step_record(session, sums, grad_norm, time.perf_counter() - step_start, images_per_sample)
                if session.env.is_main:
                    session.run.append_log(record)
                bar.update(record)
                if config.eval_every and progress.global_step % config.eval_every == 0:
                    _evaluate_and_log(session, bar)
                end_of_epoch = progress.step == 0
                last = progress.global_step == session.total_steps
                if (
                    (config.save_every and progress.global_step % config.save_every == 0)
                    or end_of_epoch
                    or last
                    or _save_time_due(session, last_save)
                ):
                    train_state.save_checkpoint(session.run, progress, forward, optimizer, scheduler)
                    last_save = time.perf_counter()
                if end_of_epoch or last:
                    break
            del batches, loader
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    steps = progress.global_step - start_step
    samples = steps * config.batch_size
    final_eval = None
    if session.history and session.history[-1]["step"] == progress.global_step:  # --eval-every hit the last step
        final_eval = session.history[-1]["report"]
    elif config.evaluate and len(session.data.test):
        final_eval = _evaluate_and_log(session, None)
    return TrainResult(
        out=Path(config.out),
        method=config.method,
        steps=progress.global_step,
        steps_this_run=steps,
        seconds=seconds,
        samples_per_second=samples / seconds if seconds > 0 else 0.0,
        images_per_second=samples * images_per_sample / seconds if seconds > 0 else 0.0,
        resumed_from=session.resumed_from,
        final_eval=final_eval,
        is_main=session.env.is_main,
        skipped_images=skipped,
    )


def _save_time_due(session: Session, last_save: float) -> bool:
    """--save-minutes elapsed since the last checkpoint, as rank 0's clock says (every rank must agree)."""
    minutes = session.config.save_minutes
    if not minutes:
        return False
    due = time.perf_counter() - last_save >= 60.0 * minutes if session.env.is_main else None
    return bool(distributed.broadcast_object(due))


def _step_record(
    session: Session, sums: dict[str, float], grad_norm: float, seconds: float, images_per_sample: int
) -> dict[str, Any]:
    progress = session.progress
    sums = distributed.mean_over_ranks(sums)
    return {
        "step": progress.global_step,
        "epoch": progress.epoch + (progress.step / session.steps_per_epoch if progress.step else 0.0),
        "lr": session.scheduler.get_last_lr()[0],
        "loss": sums.pop("total"),
        **sums,
        "grad_norm": grad_norm,
        "samples_per_s": session.config.batch_size / seconds if seconds > 0 else 0.0,
        "images_per_s": session.config.batch_size * images_per_sample / seconds if seconds > 0 else 0.0,
    }


# --- evaluation -----------------------------------------------------------------------------------------------------


def readout(levels: Levels):
    from iqa_cli.scoring.scorer import Readout

    return Readout(levels.input_ids, levels.ids, levels.names, levels.prompt, levels.regressor)


def evaluate(session: Session) -> dict[str, Any]:
    """Scores the test split with the scoring readout (`scoring.read_levels`) and reports PLCC/SRCC per
    dataset against the published MOS. Every rank scores a strided share (the same number of batches on
    every rank, as FSDP needs); rank 0 gets the numbers."""
    from torch.utils.data import DataLoader

    from iqa_cli.metrics import plcc, srcc
    from iqa_cli.scoring.scorer import read_levels

    test = session.data.test
    env = session.env
    per_rank = math.ceil(len(test) / env.world_size)
    mine = np.arange(env.rank, per_rank * env.world_size, env.world_size) % len(test)
    dataset = train_data.EvalImages([test.paths[i] for i in mine], session.preprocessor)
    workers = session.config.workers if session.config.workers is not None else _default_workers(env)
    loader = DataLoader(
        dataset,
        batch_size=session.config.eval_batch_size,
        collate_fn=train_data.collate_eval,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
    )
    core, look = session.core, readout(session.levels)
    was_training = core.training
    core.eval()
    results: dict[int, tuple[float, float]] = {}
    try:
        for pixels, index, ok in loader:
            with _autocast(session):
                scores = read_levels(core, pixels, look)
            reg = scores.score_reg if scores.score_reg is not None else torch.full_like(scores.score, math.nan)
            for j in range(len(index)):
                if ok[j]:
                    results.setdefault(int(mine[int(index[j])]), (float(scores.score[j]), float(reg[j])))
    finally:
        core.train(was_training)
    gathered: dict[int, tuple[float, float]] = {}
    for part in distributed.all_gather_object(results):
        gathered.update(part)
    if not env.is_main:
        return {}
    report: dict[str, Any] = {}
    rows = np.array(sorted(gathered), dtype=np.int64)
    if not len(rows):
        return report
    score = np.array([gathered[i][0] for i in rows])
    reg = np.array([gathered[i][1] for i in rows])
    for g, meta in enumerate(session.data.metas):
        pick = test.group[rows] == g
        if pick.sum() < 2:
            continue
        mos = test.mos_raw[rows[pick]]
        entry = {"n": int(pick.sum()), "plcc": plcc(score[pick], mos), "srcc": srcc(score[pick], mos)}
        if session.levels.regressor:
            entry["plcc_reg"] = plcc(reg[pick], mos)
            entry["srcc_reg"] = srcc(reg[pick], mos)
        report[meta.name] = entry
    return report


def _evaluate_and_log(session: Session, bar) -> dict[str, Any]:
    report = evaluate(session)
    session.history.append({"step": session.progress.global_step, "report": report})
    if session.env.is_main and report:
        session.run.append_log({"step": session.progress.global_step, "eval": report})
        for name, entry in report.items():
            line = f"eval step {session.progress.global_step}: {name} PLCC {entry['plcc']:.4f} SRCC {entry['srcc']:.4f}"
            if "plcc_reg" in entry:
                line += f" (regressor PLCC {entry['plcc_reg']:.4f} SRCC {entry['srcc_reg']:.4f})"
            if bar is not None:
                bar.print(line)
            else:
                session.log(line)
    return report


# --- progress -------------------------------------------------------------------------------------------------------


class _Bar:
    """A rich progress bar on rank 0 (nothing with --quiet or on other ranks)."""

    def __init__(self, session: Session):
        self.session = session
        self.progress = None
        if session.env.is_main and not session.config.quiet and session.console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=session.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=session.total_steps, completed=session.progress.global_step, info=""
            )

    def update(self, record: dict) -> None:
        if self.progress is None:
            return
        info = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['images_per_s']:.1f} img/s"
        self.progress.update(self.task, completed=record["step"], info=info)

    def print(self, line: str) -> None:
        if self.progress is not None:
            self.progress.console.print(line, markup=False, soft_wrap=True)
        else:
            self.session.log(line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _progress_bar(session: Session) -> _Bar:
    return _Bar(session)


# --- finishing ------------------------------------------------------------------------------------------------------


def finish(session: Session, result: TrainResult) -> TrainResult:
    """Writes the model, tokenizer, preprocessor and iqa.json into --out (and --merge's full copy)."""
    config = session.config
    info = train_state.RunRecord(
        method=config.method,
        level_names=list(session.levels.names),
        level_tokens=list(session.levels.tokens),
        prompt=session.levels.prompt,
        input_ids=list(session.levels.input_ids),
        regressor=session.levels.regressor,
        base=session.base,
        layout=config.layout,
        steps=session.progress.global_step,
        train=config.to_json(),
        final_eval=result.final_eval,
        base_revision=session.base_revision,
    )
    merged = train_state.save_final(
        session.run,
        info,
        core=session.core,
        peft_model=session.peft_model,
        tokenizer=session.tokenizer,
        preprocessor=session.preprocessor,
        strategy=session.strategy,
        merge=config.merge,
        keep_checkpoints=config.keep_checkpoints,
        dtype=session.autocast_dtype,  # full models trained with bf16 compute are written in bf16
    )
    result.merged = merged
    return result


def cleanup(session: Session | None) -> None:
    distributed.destroy()


def train(config: TrainConfig, console: Any = None) -> TrainResult:
    """Runs `iqa train`: setup -> train -> write the checkpoint directory -> cleanup.

    Raises:
        UserError: a bad flag, --out or --datasets, before anything is loaded.
        TrainInterrupted: SIGINT/SIGTERM (also when started in the background, where SIGINT starts ignored).
    """
    validate(config)
    train_data.check_metas(config.datasets, resolve_data_dir(config.data_dir))  # before --overwrite clears --out
    env = distributed.env()
    session = lock = None
    restore_signals = interrupts.install()
    try:
        distributed.init(distributed.resolve_device(config.device, env))
        run = train_state.RunDirectory(Path(config.out))
        say = None if config.quiet or console is None else lambda line: console.print(line, markup=False)
        lock = run_lock.acquire(  # one run per --out; under torchrun, one lock for all ranks
            run.out / run_lock.LOCK_NAME, command="iqa train", target=f"--out {run.out}", wait=config.wait, say=say
        )
        # Rank 0 decides (fresh, resume, complete, or an error message) before anything heavy is loaded.
        decision = distributed.broadcast_object(
            train_state.plan_run(run, config.to_json(), RUN_CONTROL_FIELDS) if env.is_main else None
        )
        if decision not in ("fresh", "resume", "complete"):
            raise UserError(decision)
        if decision == "complete":
            return TrainResult(
                out=Path(config.out),
                method=config.method,
                steps=run.completed_steps(),
                steps_this_run=0,
                seconds=0.0,
                samples_per_second=0.0,
                images_per_second=0.0,
                resumed_from=None,
                already_complete=True,
                is_main=env.is_main,
            )
        session = setup(config, decision, console)
        result = run_training(session)
        return finish(session, result)
    except interrupts.Interrupted as exc:
        raise TrainInterrupted(exc.signum, train_state.RunDirectory(Path(config.out)), env.is_main) from None
    finally:
        restore_signals()
        if lock is not None:
            lock.release()
        cleanup(session)


__all__ = [
    "METHODS",
    "QAlignLoss",
    "TrainConfig",
    "TrainForward",
    "TrainInterrupted",
    "TrainResult",
    "compute_loss",
    "cosine_with_warmup",
    "evaluate",
    "finish",
    "run_training",
    "setup",
    "train",
]
