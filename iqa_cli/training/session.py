"""`setup`: everything a training run holds between setup and cleanup, built once.

Reads the prepared metas (`training.data`), loads the model as its family's `Backbone` (`models.backbone`),
adds the Q-Scorer score tokens and regressor, picks the trainable parts (LoRA through peft, or full tuning; vision
model and abstractor trainable unless frozen), wraps the model for the launch (one process, DDP for LoRA,
FSDP2 for full tuning; `distributed`), builds AdamW + cosine-with-warmup, and restores a checkpoint of an
interrupted run of the same configuration (`training.state`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from iqa_cli import distributed
from iqa_cli.constants import DEFAULT_QUESTION, QUESTIONS
from iqa_cli.errors import UserError
from iqa_cli.paths import resolve_data_dir
from iqa_cli.process import default_workers
from iqa_cli.tasks import DEFAULT_TASK
from iqa_cli.training import data as train_data
from iqa_cli.training import state as train_state
from iqa_cli.training.config import TrainConfig
from iqa_cli.training.model import (
    Levels,
    TrainForward,
    add_regressor,
    apply_lora,
    level_setup,
    select_trainable,
)
from iqa_cli.training.objectives import OBJECTIVES, LossSpec
from iqa_cli.training.optimizer import build_optimizer


@dataclass
class Session:
    """Everything a training run holds between setup and cleanup."""

    config: TrainConfig
    env: distributed.DistEnv
    device: torch.device
    data: train_data.TrainData
    backbone: Any  # the family's Backbone; training calls its model only through it
    core: nn.Module  # backbone.model
    peft_model: nn.Module | None
    forward: nn.Module  # TrainForward, wrapped in DDP when distributed with LoRA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
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


def setup(config: TrainConfig, decision: str = "fresh", console: Any = None, backbone: Any = None) -> Session:
    """Data, model, trainable parts, wrapping, optimizer, schedule; restores the checkpoint when `decision`
    is "resume". The process group (if any) is already initialized. `backbone` replaces loading
    `config.model.name`, for benchmarks that build a full-size model with random weights in memory."""
    from iqa_cli.models.backbone import load_backbone

    objective = OBJECTIVES[config.method]
    env = distributed.env()
    device = distributed.resolve_device(config.control.device, env)
    lora = config.lora.enabled
    strategy = "single"
    if env.is_distributed:
        strategy = config.optim.strategy if config.optim.strategy != "auto" else ("ddp" if lora else "fsdp")
    elif config.optim.strategy == "fsdp":  # FSDP2 in one process (a group of one rank): benchmarks, tests
        strategy = "fsdp"
        distributed.init_single_process(device)
    plan = train_data.BatchPlan(config.optim.batch_size, env.world_size, config.optim.grad_accum)
    run = train_state.RunDirectory(Path(config.out))
    questions = (DEFAULT_QUESTION,) if config.data.fixed_question else QUESTIONS
    data = train_data.load_train_data(
        config.data.datasets,
        resolve_data_dir(config.data.data_dir),
        images=config.data.images,
        seed=config.optim.seed,
        num_questions=len(questions),
    )
    if decision == "resume":
        _check_same_data(run, data)
    pool = train_data.weighted_rows(data.train.group, config.data.repeats or [1] * len(data.metas))
    steps_per_epoch = plan.steps_per_epoch(len(pool))
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {config.optim.batch_size} is larger than the {len(pool)} training samples")
    torch.manual_seed(config.optim.seed)  # the Q-Scorer MLP and LoRA initializations (the same on every rank)
    if backbone is None:
        backbone = load_backbone(
            config.model.name, base=config.model.base, dtype=torch.float32, device=device, **config.model.options
        )
    provenance = backbone.provenance
    if lora and provenance.layout != "full":
        raise UserError(f"--model {config.model.name} is a LoRA adapter; train a LoRA on a full model (merge it first)")
    core = backbone.model
    if objective.regressor:
        add_regressor(config, backbone)
    levels = level_setup(config, data.level_names, backbone)
    if objective.score_tokens:
        backbone.record_score_tokens(levels.ids)
    image_first = config.data.layout == "reference"
    if any(video for _, video in data.prompt_sets) and getattr(backbone, "video_transform", None) is None:
        raise UserError(f"--datasets hold videos, which the {backbone.name} family does not take")
    task = data.task()
    if task != DEFAULT_TASK:  # every dataset rates aesthetics: the run is scored with that prompt by default
        levels.prompt, levels.input_ids = train_data.scoring_ids(backbone, task, False, levels.tokens, levels.ids)
    encodings = train_data.encode_prompt_sets(
        backbone,
        data.prompt_sets,
        levels.tokens,
        levels.ids,
        image_first=image_first,
        fixed_question=config.data.fixed_question,
    )
    vocab = backbone.vocab_size
    largest = max(max(enc.input_ids) for enc in encodings.values())
    if largest >= vocab:
        raise UserError(
            f"{config.model.name}: the tokenizer gives id {largest} but the model has {vocab} embedding rows"
        )

    core.train()
    if config.model.gradient_checkpointing:
        backbone.set_gradient_checkpointing(True)
    peft_model = apply_lora(config, backbone) if lora else None
    select_trainable(config, backbone, lora=lora)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    if autocast_dtype is not None and lora:  # frozen weights in bf16 (the reference casts the model)
        for p in core.parameters():
            if not p.requires_grad:
                p.data = p.data.to(autocast_dtype)
    forward = TrainForward(peft_model if peft_model is not None else core, backbone)
    if strategy == "ddp":
        forward = distributed.wrap_ddp(forward, device)
    elif strategy == "fsdp":
        # Float32 parameters gathered, bf16 compute by the same autocast as one GPU: a run's numbers do not depend
        # on the GPU count (FSDP2's bf16 `param_dtype` would also make embeddings, norms and the residual stream
        # bf16, which one GPU's autocast keeps in float32). The all-gathers move float32.
        distributed.shard_units(core, backbone.fsdp_units(), device, mixed_precision=None)
        # The decoder layers also return their (unused) key/value views; nothing modifies them in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")

    total = steps_per_epoch * config.optim.epochs
    if config.optim.max_steps:
        total = min(total, config.optim.max_steps)
    optimizer, scheduler = build_optimizer(
        forward, config.optim.lr, config.optim.weight_decay, total, config.optim.warmup_ratio
    )
    loss = config.loss
    spec = LossSpec(
        method=config.method,
        level_ids=levels.ids,
        weights=config.weights(),
        fixed_std=loss.fid_std == "fixed",
        detach_pred_std=loss.detach_pred_std,
        closed_set=loss.closed_set,
        w_in_level=loss.w_in_level,
        w_mse=loss.w_mse,
        w_nin=loss.w_nin,
        w_rank=loss.w_rank,
        margin=loss.rank_margin,
        mse_clamp=loss.mse_clamp,
    )
    base = provenance.model if lora else None  # repo id or absolute path
    session = Session(
        config=config,
        env=env,
        device=device,
        data=data,
        backbone=backbone,
        core=core,
        peft_model=peft_model,
        forward=forward,
        optimizer=optimizer,
        scheduler=scheduler,
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
        base_revision=(provenance.revision or None) if lora else None,
        loaded_layout=provenance.layout,
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
    train_state.check_same_data(run, data.fingerprint, [m.path for m in data.metas], finished=False)


def _logger(session: Session) -> Callable[[str], None]:
    def log(message: str) -> None:
        if session.env.is_main and not session.config.control.quiet:
            if session.console is not None:
                session.console.print(message, markup=False, soft_wrap=True)
            else:
                print(message, file=sys.stderr)

    return log


def workers(session: Session) -> int:
    """--workers, or the cores this rank may use, less one for the loop, at most 8."""
    chosen = session.config.control.workers
    return chosen if chosen is not None else default_workers(session.env.local_world_size, keep_free=1)


def autocast(session: Session):
    """bf16 autocast on CUDA, nothing on CPU."""
    if session.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(session.device.type, dtype=session.autocast_dtype)
