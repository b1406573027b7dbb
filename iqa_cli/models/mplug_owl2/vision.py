"""The mPLUG-Owl2 vision encoder: a CLIP-style ViT-L/14 at 448 px (`model.vision_model.*`).

patch conv (no bias) -> [cls; patches] + learned positions -> pre-LayerNorm -> N x (pre-norm attention with a
fused `query_key_value` projection, pre-norm QuickGELU MLP) -> post-LayerNorm. The abstractor reads the
post-LayerNorm output of every token (cls included), as the reference's `encode_images` takes
`last_hidden_state`, which its `MplugOwlVisionModel.forward` returns after `post_layernorm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from iqa_cli.models.mplug_owl2.config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class VisionEmbeddings(nn.Module):
    """Patch tokens with a prepended cls token and learned absolute positions, then the pre-LayerNorm."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embed = nn.Conv2d(
            config.num_channels, c, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_positions, c))
        self.pre_layernorm = nn.LayerNorm(c, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # B, N, C (row-major patches)
        cls = self.cls_token.expand(patches.shape[0], 1, -1).to(patches.dtype)
        x = torch.cat([cls, patches], dim=1)  # B, N+1, C
        x = x + self.position_embedding[:, : x.shape[1]].to(x.dtype)
        return self.pre_layernorm(x)


class VisionAttention(nn.Module):
    """Bidirectional self-attention with one fused projection.

    The fused output is laid out per head as [head, (q, k, v), head_dim], i.e. the reference reshapes it
    to (B, N, H, 3, D): the q/k/v rows of head h are rows [3hD, 3hD+D), [3hD+D, 3hD+2D), [3hD+2D, 3hD+3D).
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.query_key_value(x).view(b, n, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)  # each B, H, N, D
        out = F.scaled_dot_product_attention(q, k, v)
        return self.dense(out.transpose(1, 2).reshape(b, n, c))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class VisionModel(nn.Module):
    """pixels [B, 3, S, S] -> post-LayerNorm tokens [B, 1 + (S/P)^2, C] (cls first)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
