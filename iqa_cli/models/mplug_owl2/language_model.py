"""The modality-adaptive LLaMA-2 decoder of mPLUG-Owl2 (`model.embed_tokens`, `model.layers.*`, `model.norm`).

A LLaMA-2 decoder in which the two RMSNorms of every layer and the k/v projections are "multiway": two
copies, index 0 for text tokens and 1 for visual tokens, picked per token by a modality indicator
(reference `MultiwayNetwork` in modeling_llama2.py). q_proj, o_proj and the SwiGLU MLP are shared.

Numerics follow the reference (transformers 4.36 LLaMA): RMSNorm in float32 then cast back before the
weight; RoPE in the rotate-half convention (the two halves of each head are the real/imaginary parts)
with cos/sin computed in float32 and cast to the activations' dtype; attention scaled by 1/sqrt(head_dim).
Torch only: no transformers helpers, so the port does not move when transformers changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from iqa_cli.models.mplug_owl2.config import LanguageModelConfig


@dataclass
class Modality:
    """Which tokens are visual (multiway index 1), built once per forward and shared by all layers.

    `text_index` / `visual_index` are flat indices into the B*T tokens (None when there are none), so a
    multiway projection runs each copy only over its own tokens.
    """

    is_visual: torch.Tensor  # B, T bool
    text_index: torch.Tensor | None
    visual_index: torch.Tensor | None

    @classmethod
    def text_only(cls, batch: int, length: int, device: torch.device | str | None = None) -> Modality:
        is_visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
        return cls(is_visual, torch.arange(batch * length, device=device), None)

    @classmethod
    def from_mask(cls, is_visual: torch.Tensor) -> Modality:
        """General case (one host sync for the nonzero)."""
        flat = is_visual.reshape(-1)
        text, visual = (~flat).nonzero().squeeze(1), flat.nonzero().squeeze(1)
        return cls(is_visual, text if text.numel() else None, visual if visual.numel() else None)

    @classmethod
    def from_blocks(cls, start: torch.Tensor, block: int, length: int) -> Modality:
        """One contiguous visual block of `block` tokens per row starting at `start` [B]; no host sync."""
        b, device = start.shape[0], start.device
        rows = torch.arange(b, device=device)[:, None] * length
        visual = start[:, None] + torch.arange(block, device=device)  # B, V
        k = torch.arange(length - block, device=device)[None]
        text = k + block * (k >= start[:, None])  # B, L - V: positions outside the block, in order
        is_visual = torch.zeros(b, length, dtype=torch.bool, device=device)
        is_visual.scatter_(1, visual, True)
        text_index = (rows + text).reshape(-1) if length > block else None
        return cls(is_visual, text_index, (rows + visual).reshape(-1))


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps), computed in (at least) float32, returned in x's dtype (no weight)."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_norm(x, self.eps)


class MultiwayRMSNorm(nn.Module):
    """Two RMSNorms; the normalization is shared, only the weight is picked per token."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.multiway = nn.ModuleList([RMSNorm(dim, eps), RMSNorm(dim, eps)])

    def forward(self, x: torch.Tensor, modality: Modality) -> torch.Tensor:
        if modality.visual_index is None:
            return self.multiway[0](x)
        if modality.text_index is None:
            return self.multiway[1](x)
        weight = torch.where(modality.is_visual[..., None], self.multiway[1].weight, self.multiway[0].weight)
        return weight * rms_norm(x, self.eps)


class MultiwayLinear(nn.Module):
    """Two linear maps; each runs only over the tokens of its modality."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.out_features = out_features
        self.multiway = nn.ModuleList(
            [nn.Linear(in_features, out_features, bias), nn.Linear(in_features, out_features, bias)]
        )

    def forward(self, x: torch.Tensor, modality: Modality) -> torch.Tensor:
        if modality.visual_index is None:
            return self.multiway[0](x)
        if modality.text_index is None:
            return self.multiway[1](x)
        flat = x.reshape(-1, x.shape[-1])
        text = self.multiway[0](flat.index_select(0, modality.text_index))
        visual = self.multiway[1](flat.index_select(0, modality.visual_index))
        out = text.new_empty(flat.shape[0], self.out_features)
        out = out.index_copy(0, modality.text_index, text).index_copy(0, modality.visual_index, visual)
        return out.view(*x.shape[:-1], self.out_features)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D] in float32 for integer positions [B, T]; frequency i of both halves is theta^(-2i/D)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = (positions.float() / scale)[..., None] * inv_freq  # B, T, D/2
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [B, H, T, D]; cos/sin [B, T, D] are cast to x's dtype first, as in the reference."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        c, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        bias = config.attention_bias
        self.q_proj = nn.Linear(c, self.num_heads * d, bias)
        self.k_proj = MultiwayLinear(c, self.num_kv_heads * d, bias)
        self.v_proj = MultiwayLinear(c, self.num_kv_heads * d, bias)
        self.o_proj = nn.Linear(self.num_heads * d, c, bias)

    def forward(
        self,
        x: torch.Tensor,
        modality: Modality,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # B, H, T, D
        k = self.k_proj(x, modality).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x, modality).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        present = (k, v)
        if self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        causal = mask is None and past is None and t > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), present


class MLP(nn.Module):
    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = MultiwayRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MultiwayRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, modality, rope, mask, past=None):
        attn, present = self.self_attn(self.input_layernorm(x, modality), modality, rope, mask, past)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x, modality))
        return x, present


@dataclass
class KVCache:
    """Keys/values of every layer after RoPE, for cached decoding.

    keys/values: per layer [B, H_kv, S, D]; key_padding [B, S] (True = a real token);
    next_position [B]: the RoPE position the next real token of each row gets.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_padding: torch.Tensor
    next_position: torch.Tensor

    @property
    def seq_len(self) -> int:
        return self.key_padding.shape[1]


def attention_mask(key_padding: torch.Tensor, query_len: int, past_len: int) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask: causal over absolute positions, padded keys hidden.

    Every query also sees itself, so the rows of padding queries are never empty (no NaN); real
    queries are unaffected because their own key is real.
    """
    s = key_padding.shape[1]
    device = key_padding.device
    query_pos = past_len + torch.arange(query_len, device=device)[:, None]  # T, 1
    key_pos = torch.arange(s, device=device)[None]  # 1, S
    mask = (key_pos <= query_pos)[None] & key_padding[:, None, :]  # B, T, S
    mask = mask | (key_pos == query_pos)[None]
    return mask[:, None]


class LlamaMultiwayModel(nn.Module):
    """Token embeddings, decoder layers and the final RMSNorm (the LLM part of `model.*`)."""

    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        self.lm_config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        modality: Modality,
        *,
        padding: torch.Tensor | None = None,
        past: KVCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Runs the decoder over embeddings [B, T, C]; returns final-norm hidden states and the new cache.

        `padding` [B, T] marks real tokens (True/1); padded tokens get no attention from real ones and do
        not advance the RoPE positions, so left and right padding leave real tokens' outputs unchanged.
        """
        b, t, _ = inputs_embeds.shape
        device = inputs_embeds.device
        valid = torch.ones(b, t, dtype=torch.bool, device=device) if padding is None else padding.to(torch.bool)
        start = past.next_position if past is not None else torch.zeros(b, dtype=torch.long, device=device)
        positions = (start[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)  # B, T
        past_len = past.seq_len if past is not None else 0
        key_padding = valid if past is None else torch.cat([past.key_padding, valid], dim=1)
        mask = None if padding is None and past is None else attention_mask(key_padding, t, past_len)
        cfg = self.lm_config
        scale = float(cfg.rope_scaling["factor"]) if cfg.rope_scaling else 1.0
        rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, scale)
        x = inputs_embeds
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            layer_past = (past.keys[i], past.values[i]) if past is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, present = checkpoint(layer, x, modality, rope, mask, layer_past, use_reentrant=False)
            else:
                x, present = layer(x, modality, rope, mask, layer_past)
            if use_cache:
                keys.append(present[0])
                values.append(present[1])
        cache = KVCache(keys, values, key_padding, start + valid.long().sum(1)) if use_cache else None
        return self.norm(x), cache
