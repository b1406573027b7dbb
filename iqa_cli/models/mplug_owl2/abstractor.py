"""The visual abstractor: learnable queries that compress the ViT tokens (`model.visual_abstractor.*`).

Per layer (reference `MplugOwlVisualAbstractorAttention.forward` and the modules it calls):

    q   = norm1(x)                                   x: queries, B, Q, C
    kv  = [q ; normk(image)]                         B, Q + N, C  (keys/values include the queries)
    ctx = softmax((q + Pq) Wq ((kv + [Pq; Pk]) Wk)^T / sqrt(d)) (kv Wv)     no mask
    x   = q + out_proj(ctx)                          the residual starts from the *normed* queries
    x   = x + w2(ffn_ln(silu(w1 n) * w3 n)),  n = norm2(x)

Pq is a 1-D sin-cos table over the query index and Pk a 2-D sin-cos table over the patch grid with a zero
row for the cls token (MAE's `get_2d_sincos_pos_embed(..., cls_token=True)`); both are fixed buffers,
computed here. norm1/normk/norm2 are LayerNorms with torch's default eps 1e-5 (the reference does not pass
the config's eps to them); ffn_ln uses the config's eps. After the layers, `visual_fc` maps the queries to
the LLM width and the learned `vit_eos` token is appended, so one image becomes Q + 1 = 65 LLM tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from iqa_cli.models.mplug_owl2.config import AbstractorConfig


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin(p w) ; cos(p w)] with w_i = 10000^(-i / (dim/2)), in float32 as the reference's numpy code; M, dim."""
    omega = torch.arange(dim // 2, dtype=torch.float32, device=positions.device) / (dim / 2.0)
    omega = 1.0 / (10000.0**omega)
    angles = torch.outer(positions.to(torch.float32).reshape(-1), omega)  # M, dim/2
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_with_cls(dim: int, grid_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Key position table: a zero row for cls, then patch (row i, column j) in row-major order as
    [sincos_1d(dim/2, j) ; sincos_1d(dim/2, i)] (the reference's meshgrid puts the column index first); 1 + G*G, dim.
    """
    idx = torch.arange(grid_size, dtype=torch.float32, device=device)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")  # G, G each
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, device=device), table], dim=0)


def abstractor_pos_embeds(
    config: AbstractorConfig, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_pos_embed [Q, C], k_pos_embed [1 + G*G, C]) in float32.

    On the meta device only the shapes exist: the tables are not computed there, because torch's meta kernel
    for `arange` imports torch._dynamo (about 1 s of `iqa score`'s start). Loading fills them on the real device.
    """
    where = torch.device(device) if device is not None else torch.get_default_device()
    if where.type == "meta":
        c = config.hidden_size
        return torch.empty(config.num_learnable_queries, c, device=where), torch.empty(
            1 + config.grid_size**2, c, device=where
        )
    positions = torch.arange(config.num_learnable_queries, dtype=torch.float32, device=device)
    return sincos_1d(config.hidden_size, positions), sincos_2d_with_cls(config.hidden_size, config.grid_size, device)


class AbstractorAttention(nn.Module):
    """Multi-head attention of the queries over [queries; image tokens] with fixed sin-cos positions."""

    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        self.value = nn.Linear(config.encoder_hidden_size, config.hidden_size)
        q_pos, k_pos = abstractor_pos_embeds(config)
        self.register_buffer("q_pos_embed", q_pos)
        self.register_buffer("k_pos_embed", k_pos)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, nq, c = q.shape
        h, d = self.num_heads, c // self.num_heads
        q_pos = self.q_pos_embed.to(q.dtype)
        kv_pos = torch.cat([q_pos, self.k_pos_embed.to(q.dtype)], dim=0)  # Q + N, C
        query = self.query(q + q_pos).view(b, nq, h, d).transpose(1, 2)  # B, H, Q, D
        key = self.key(kv + kv_pos).view(b, -1, h, d).transpose(1, 2)  # B, H, Q+N, D
        value = self.value(kv).view(b, -1, h, d).transpose(1, 2)
        ctx = F.scaled_dot_product_attention(query, key, value, scale=1.0 / math.sqrt(d))
        return ctx.transpose(1, 2).reshape(b, nq, c)


class AbstractorMLP(nn.Module):
    """SwiGLU with a LayerNorm on the gated hidden: w2(ffn_ln(silu(w1 x) * w3 x))."""

    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_ln = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class AbstractorOutput(nn.Module):
    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm2 = nn.LayerNorm(config.hidden_size)  # torch default eps, as in the reference
        self.mlp = AbstractorMLP(config)

    def forward(self, ctx: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = residual + self.out_proj(ctx)
        return x + self.mlp(self.norm2(x))


class AbstractorCrossAttention(nn.Module):
    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.attention = AbstractorAttention(config)
        self.output = AbstractorOutput(config)
        self.norm1 = nn.LayerNorm(config.hidden_size)  # torch default eps, as in the reference
        self.normk = nn.LayerNorm(config.hidden_size)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        q = self.norm1(queries)
        kv = torch.cat([q, self.normk(image)], dim=1)
        return self.output(self.attention(q, kv), q)


class AbstractorLayer(nn.Module):
    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.crossattention = AbstractorCrossAttention(config)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.crossattention(queries, image)


class AbstractorEncoder(nn.Module):
    def __init__(self, config: AbstractorConfig):
        super().__init__()
        self.layers = nn.ModuleList(AbstractorLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                queries = checkpoint(layer, queries, image, use_reentrant=False)
            else:
                queries = layer(queries, image)
        return queries


class VisualAbstractor(nn.Module):
    """ViT tokens [B, N, Cv] -> LLM visual tokens [B, Q + 1, H] (Q queries through visual_fc, then vit_eos)."""

    def __init__(self, config: AbstractorConfig, language_hidden_size: int):
        super().__init__()
        self.config = config
        self.encoder = AbstractorEncoder(config)
        self.visual_fc = nn.Linear(config.hidden_size, language_hidden_size)
        self.query_embeds = nn.Parameter(torch.zeros(1, config.num_learnable_queries, config.hidden_size))
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, language_hidden_size))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        queries = self.query_embeds.expand(image.shape[0], -1, -1).to(image.dtype)
        x = self.visual_fc(self.encoder(queries, image))  # B, Q, H
        eos = self.vit_eos.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([x, eos], dim=1)
