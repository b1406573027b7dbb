"""The step loop: epochs of micro batches, optimizer steps (gradient accumulation, bf16 autocast on CUDA,
gradient clipping at 1.0 as the reference's HF Trainer does), a JSONL log line per step, in-loop evaluation
and the timing of resumable checkpoints."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from iqa_cli import distributed, interrupts
from iqa_cli.errors import UserError
from iqa_cli.losses import LossParts
from iqa_cli.progress import progress_bar
from iqa_cli.training import data as train_data
from iqa_cli.training import state as train_state
from iqa_cli.training.evaluation import evaluate_and_log
from iqa_cli.training.objectives import OBJECTIVES, compute_loss
from iqa_cli.training.session import Session, autocast, workers


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


def _loader(session: Session, epoch: int, start_step: int):
    from torch.utils.data import DataLoader

    config = session.config
    seed, paired = config.optim.seed, config.paired
    order = train_data.epoch_order(session.pool, seed, epoch)
    partners = train_data.draw_partners(order, session.data.train.group, seed, epoch) if paired else None
    sampler = train_data.EpochSampler(order, partners, session.plan, session.env.rank, start_step)
    backbone = session.backbone
    dataset = train_data.TrainImages(
        session.data.train,
        session.encodings,
        backbone.transform,
        session.data.train.level,
        video_transform=getattr(backbone, "video_transform", None),
        sampling=config.data.sampling(),
    )
    video_collate = getattr(backbone, "video_collate", None)
    collate = train_data.Collate(backbone.pad_id, session.data.train, paired, backbone.collate, video_collate)
    n_workers = workers(session)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=n_workers,
        pin_memory=session.device.type == "cuda",
        # A private generator: creating the iterator must not draw from the global RNG (resume equality).
        generator=torch.Generator().manual_seed(seed + epoch),
        prefetch_factor=4 if n_workers else None,
        persistent_workers=False,
        worker_init_fn=interrupts.leave_to_main_process,  # a stop for the group: the main process saves first
    )


def _micro_step(session: Session, batch: train_data.TrainBatch, scale: float) -> LossParts:
    batch = batch.to(session.device)
    reg_pos = batch.level_pos - 1 if OBJECTIVES[session.config.method].regressor else None
    with autocast(session):
        logits, pred = session.forward(batch.input_ids, batch.visual, batch.attention_mask, reg_pos)
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
    show = session.env.is_main and not config.control.quiet
    bar = progress_bar(
        session.console, session.total_steps, "train", show=show, completed=progress.global_step, say=session.log
    )
    params = [p for p in forward.parameters() if p.requires_grad]
    with bar:
        while progress.epoch < config.optim.epochs and progress.global_step < session.total_steps:
            loader = _loader(session, progress.epoch, progress.step)
            batches = iter(loader)
            while progress.step < session.steps_per_epoch:
                step_start = time.perf_counter()
                totals = None  # the loss parts, summed on the device: one host sync a step, not one a part a micro step
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
                    names = [f.name for f in dataclasses.fields(parts)]
                    values = torch.stack([getattr(parts, n).detach().double().reshape(()) for n in names])
                    totals = values / plan.accumulation if totals is None else totals + values / plan.accumulation
                sums = dict(zip(names, totals.tolist(), strict=True))
                grad_norm = distributed.clip_grad_norm(params, config.optim.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.advance(session.steps_per_epoch)
                record = _step_record(session, sums, grad_norm, time.perf_counter() - step_start, images_per_sample)
                if session.env.is_main:
                    session.run.append_log(record)
                info = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['images_per_s']:.1f} img/s"
                bar.update(record["step"], info)
                if config.eval.every and progress.global_step % config.eval.every == 0:
                    evaluate_and_log(session, bar.print)
                end_of_epoch = progress.step == 0
                last = progress.global_step == session.total_steps
                if _checkpoint_due(session, end_of_epoch or last, last_save):
                    train_state.save_checkpoint(session.run, progress, forward, optimizer, scheduler)
                    last_save = time.perf_counter()
                if end_of_epoch or last:
                    break
            del batches, loader
    seconds = time.perf_counter() - started
    steps = progress.global_step - start_step
    samples = steps * config.optim.batch_size
    final_eval = None
    if session.history and session.history[-1]["step"] == progress.global_step:  # --eval-every hit the last step
        final_eval = session.history[-1]["report"]
    elif config.eval.enabled and len(session.data.test):
        final_eval = evaluate_and_log(session, session.log)
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


def _checkpoint_due(session: Session, epoch_or_run_end: bool, last_save: float) -> bool:
    """Every --save-every steps, at the end of each epoch and of the run, and when --save-minutes passed."""
    every = session.config.checkpoint.every
    return (
        bool(every and session.progress.global_step % every == 0)
        or epoch_or_run_end
        or _save_time_due(session, last_save)
    )


def _save_time_due(session: Session, last_save: float) -> bool:
    """--save-minutes elapsed since the last checkpoint, as rank 0's clock says (every rank must agree)."""
    minutes = session.config.checkpoint.minutes
    if not minutes:
        return False
    due = time.perf_counter() - last_save >= 60.0 * minutes if session.env.is_main else None
    return bool(distributed.broadcast_object(due))


def _step_record(
    session: Session, sums: dict[str, float], grad_norm: float, seconds: float, images_per_sample: int
) -> dict[str, Any]:
    progress = session.progress
    sums = distributed.mean_over_ranks(sums)
    batch_size = session.config.optim.batch_size
    return {
        "step": progress.global_step,
        "epoch": progress.epoch + (progress.step / session.steps_per_epoch if progress.step else 0.0),
        "lr": session.scheduler.get_last_lr()[0],
        "loss": sums.pop("total"),
        **sums,
        "grad_norm": grad_norm,
        "samples_per_s": batch_size / seconds if seconds > 0 else 0.0,
        "images_per_s": batch_size * images_per_sample / seconds if seconds > 0 else 0.0,
    }
