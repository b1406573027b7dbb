"""Q-Scorer's regression head for transformers families: an MLP from a final-norm hidden state to one score.

Blocks map hidden -> dims[0] -> dims[1] -> ...; each is relu(linear(x)), plus x where the widths match (the
paper's residual MLP); a last linear maps to 1. Saved next to the transformers checkpoint as its own file,
since `from_pretrained` keeps only the keys of the model class.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.residual = in_features == out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.linear(x))
        return out + x if self.residual else out


class Regressor(nn.Module):
    """hidden states [..., C] -> scores [...]."""

    def __init__(self, in_features: int, hidden_dims: list[int] | tuple[int, ...]):
        super().__init__()
        widths = [in_features, *hidden_dims]
        self.hidden_dims = list(hidden_dims)
        self.blocks = nn.Sequential(*(Block(a, b) for a, b in pairwise(widths)))
        self.out = nn.Linear(widths[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(x.to(self.out.weight.dtype))).squeeze(-1)
