"""The closed-set readout's moments: K logits -> probabilities, their mean and spread over the level centers.
Shared by the level readout (`scoring.readout`) and the digit readout of reasoning models (`scoring.reasoning`)."""

from __future__ import annotations

import torch


def level_moments(level_logits: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Closed-set softmax over the K level logits [B, K] -> (probs, mean, std), in float32."""
    probs = torch.softmax(level_logits.float(), dim=-1)
    centers = centers.to(probs.device)
    mean = probs @ centers
    var = (probs * (centers[None] - mean[:, None]) ** 2).sum(-1)
    return probs, mean, var.clamp_min(0).sqrt()
