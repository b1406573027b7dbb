"""AdamW and its schedule, as the reference's HF Trainer builds them: no weight decay on biases and norm
gains, linear warmup then cosine decay to 0 (transformers' own `get_cosine_schedule_with_warmup`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from iqa_cli.errors import UserError


def warmup_steps(total: int, ratio: float) -> int:
    """`ceil(total * ratio)`, as transformers' `TrainingArguments.get_warmup_steps`."""
    return math.ceil(total * ratio)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm gains (1-D tensors), as the reference's Trainer."""
    decay, plain = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else plain).append(p)
    if not decay and not plain:
        raise UserError("nothing to train: every parameter is frozen")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(
    module: nn.Module, lr: float, weight_decay: float, total: int, warmup_ratio: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9/0.999, eps 1e-8) over the trainable parameters and its cosine-with-warmup schedule."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(total, warmup_ratio), total)
    return optimizer, scheduler
