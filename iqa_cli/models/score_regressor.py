"""Q-Scorer's regression head, shared by every family: an MLP from an LLM hidden state to one quality score.

Blocks `model.{i}.linear` map hidden -> dims[0] -> dims[1] -> ...; each block is relu(linear(x)), plus x when
its input and output widths match (the reference's `ResidualMLPBlock`); `output_layer` maps the last width to
1 with no activation. These are the reference's key names, so the released Q-Scorer weights load as they are.
The reference's `score()` clamps the output to [0, 5]; its `scorer.py` does not, so the clamp is left to the
caller.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_HIDDEN_DIMS = (2048, 1024)


class ResidualReLUBlock(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.residual = in_features == out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.linear(x))
        return out + x if self.residual else out


class ScoreRegressor(nn.Module):
    """hidden states [..., C] -> scores [...]."""

    def __init__(self, in_features: int, hidden_dims: list[int] | tuple[int, ...] = DEFAULT_HIDDEN_DIMS):
        super().__init__()
        widths = [in_features, *hidden_dims]
        self.hidden_dims = list(hidden_dims)  # recorded with saved weights (not a tensor, not in the state dict)
        self.model = nn.Sequential(*(ResidualReLUBlock(a, b) for a, b in pairwise(widths)))
        self.output_layer = nn.Linear(widths[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.model(x.to(self.output_layer.weight.dtype))).squeeze(-1)
