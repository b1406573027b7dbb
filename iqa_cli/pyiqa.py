"""pyiqa-style metrics backed by `iqa`: `create_metric("deqa")`, `"qalign"` (one-align), `"qscorer"`.

Why an adapter and not a pyiqa plugin: pyiqa 0.1.16 (the current release, read before writing this) has plugin
entry points only for its registries (`pyiqa.archs`, `pyiqa.models`, ...), loaded on the first registry lookup,
while `pyiqa.create_metric` first asserts that the name is a key of `DEFAULT_CONFIGS`, a plain dict that no
entry point fills. An installed plugin therefore cannot add a metric name to `pyiqa.create_metric`. This module
gives the same surface without pyiqa installed:

    from iqa_cli.pyiqa import create_metric
    metric = create_metric("deqa", device="cuda")   # a torch.nn.Module
    metric(images)                                    # [B, 3, H, W] in [0, 1] -> scores [B]; or a path / PIL image
    metric.score_range, metric.lower_better           # "1, 5", False

Tensors go through `Scorer.score_tensors` (torch preprocessing, batch-invariant; with `as_loss=True` autograd
is kept); paths and PIL images through `Scorer.score`, the reference's exact pixels. Q-Scorer's value is its
regressor's score, as its authors report it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iqa_cli.constants import DEFAULT_MODEL


@dataclass(frozen=True)
class MetricSpec:
    model: str  # Hugging Face repo id of the released checkpoint
    base: str | None = None  # the full model a LoRA checkpoint is merged onto
    score_range: str = "1, 5"  # as pyiqa's DEFAULT_CONFIGS writes it
    lower_better: bool = False
    metric_mode: str = "NR"


METRICS = {
    "deqa": MetricSpec(DEFAULT_MODEL),
    "qalign": MetricSpec("q-future/one-align"),
    "qscorer": MetricSpec("2kxx/Qscorer_lora_5_1"),  # a LoRA adapter: merged onto its family's released base
}


def list_models() -> list[str]:
    return sorted(METRICS)


def create_metric(metric_name: str, as_loss: bool = False, device: Any = None, **kwargs: Any) -> IQAMetric:
    """pyiqa's `create_metric` for the metrics above; kwargs: model, base, dtype, batch_size, loss_weight,
    loss_reduction, check_input_range."""
    if metric_name not in METRICS:
        raise KeyError(f"Unknown metric: {metric_name} (iqa provides {', '.join(list_models())})")
    return IQAMetric(metric_name, as_loss=as_loss, device=device, **kwargs)


class IQAMetric(torch.nn.Module):
    """A no-reference quality metric with pyiqa's `InferenceModel` attributes and call."""

    def __init__(
        self,
        metric_name: str,
        *,
        as_loss: bool = False,
        loss_weight: float | None = None,
        loss_reduction: str = "mean",
        device: Any = None,
        check_input_range: bool = True,
        model: str | Path | None = None,
        base: str | Path | None = None,
        dtype: str = "auto",
        batch_size: int = 16,
    ):
        super().__init__()
        from iqa_cli.scoring.scorer import Scorer

        spec = METRICS[metric_name]
        self.metric_name = metric_name
        self.metric_mode = spec.metric_mode
        self.lower_better = spec.lower_better
        self.score_range = spec.score_range
        self.as_loss = as_loss
        self.loss_weight = loss_weight
        self.loss_reduction = loss_reduction
        self.check_input_range = check_input_range and not as_loss
        self.batch_size = batch_size
        base = base if base is not None else (spec.base if model is None else None)
        self.scorer = Scorer.from_pretrained(
            model if model is not None else spec.model, base=base, device=device or "auto", dtype=dtype
        )
        self.net = self.scorer.model  # pyiqa exposes the network as `.net`

    @property
    def device(self) -> torch.device:
        return self.scorer.device

    def forward(self, target: Any, ref: Any = None) -> torch.Tensor:
        """Scores [B] on the scorer's device (a loss when `as_loss`)."""
        if ref is not None:
            raise ValueError(f"{self.metric_name} is a no-reference metric: call it without ref")
        if not torch.is_tensor(target):
            items = target if isinstance(target, list | tuple) else [target]
            results = self.scorer.score(list(items), batch_size=self.batch_size)
            values = [r.score_reg if r.score_reg is not None else r.score for r in results]
            return torch.tensor(values, dtype=torch.float32, device=self.device)
        if target.dim() != 4 or target.shape[1] not in (1, 3):
            raise ValueError(f"input must be [B, 3, H, W] (or [B, 1, H, W]), got {tuple(target.shape)}")
        if self.check_input_range and (target.min() < -1e-6 or target.max() > 1 + 1e-6):
            raise ValueError(
                f"input must be in [0, 1], got min {float(target.min()):.4f}, max {float(target.max()):.4f}"
            )
        if target.shape[1] == 1:
            target = target.expand(-1, 3, -1, -1)
        out = self.scorer.score_tensors(target, differentiable=self.as_loss, batch_size=self.batch_size)
        values = out.score_reg if out.score_reg is not None else out.score
        if not self.as_loss:
            return values
        weighted = values * (self.loss_weight if self.loss_weight is not None else 1.0)
        return {"mean": weighted.mean, "sum": weighted.sum}.get(self.loss_reduction, lambda: weighted)()
