"""The mPLUG-Owl2 language model as a whole against references that share none of its code.

Text tokens take the `multiway.0` copies, so a text-only prompt through the port must equal transformers' own
LLaMA (`LlamaForCausalLM`) built from the same weights: the SwiGLU MLP, the decoder layer's wiring (pre-norm,
two residuals), RoPE, the final RMSNorm and the LM head all count. Visual tokens take `multiway.1`; with an
image the whole forward pass is checked against a float64 decoder written out below, token by token.
"""

from __future__ import annotations

import math

import pytest
import torch

from iqa_cli.models.mplug_owl2.model import IMAGE_TOKEN_INDEX
from tests.factories import random_pixels, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=11)


def _ids(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    ids[:, 0] = 1
    return ids


def _llama_from(model) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with the port's text (`multiway.0`) weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = model.config.language
    config = LlamaConfig(
        vocab_size=lm.vocab_size,
        hidden_size=lm.hidden_size,
        intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_hidden_layers,
        num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_key_value_heads,
        max_position_embeddings=lm.max_position_embeddings,
        rms_norm_eps=lm.rms_norm_eps,
        rope_theta=lm.rope_theta,
        attention_bias=lm.attention_bias,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    llama = LlamaForCausalLM(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        if not key.startswith(("model.embed_tokens", "model.layers", "model.norm", "lm_head")):
            continue
        if ".multiway.1." in key:
            continue
        state[key.replace(".multiway.0.", ".")] = value
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("rotary_emb" in name for name in missing), missing  # every weight came from the port
    return llama


def test_text_only_forward_equals_transformers_llama(model):
    llama = _llama_from(model)
    ids = _ids(3, 12, model.config.language.vocab_size, seed=1)
    with torch.no_grad():
        ours = model(ids)
        theirs = llama(input_ids=ids, output_hidden_states=True)
    # hidden_states[-1] is transformers' final-norm output, what the LM head reads
    torch.testing.assert_close(ours.hidden_states, theirs.hidden_states[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    assert float(theirs.logits.std()) > 0.1  # logits that carry information, not a degenerate match


def test_text_only_forward_with_left_padding_equals_transformers_llama(model):
    """Padded keys hidden and positions counted over real tokens only (transformers is told the same
    positions), so a left-padded row equals transformers on the real tokens."""
    llama = _llama_from(model)
    ids = _ids(2, 10, model.config.language.vocab_size, seed=2)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = llama(input_ids=ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], rtol=1e-5, atol=1e-5)


# --- with an image: multiway routing against a float64 decoder ------------------------------------------------


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as a complex rotation of pairs (x[i], x[i + D/2]) by position * theta^(-2i/D); x [H, T, D]."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[:, None] * freq[None]  # T, D/2
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def _reference_row(w: dict[str, torch.Tensor], embeds: torch.Tensor, is_visual: torch.Tensor, config) -> torch.Tensor:
    """One prompt row through the modality-adaptive decoder in float64: each token picks the norms' and the
    k/v projections' copy of its modality (`multiway.1` for visual tokens), everything else is shared.
    Returns the logits [T, V]."""
    lm = config.language
    heads, d = lm.num_attention_heads, lm.head_dim
    t = embeds.shape[0]
    way = is_visual.long()[:, None]  # T, 1

    def pick(prefix: str) -> torch.Tensor:  # the per-token weight of a multiway module, [T, ...]
        return torch.stack([w[f"{prefix}.multiway.{i}.weight"] for i in (0, 1)])[way[:, 0]]

    def multiway_linear(prefix: str, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("toi,ti->to", pick(prefix), x)

    positions = torch.arange(t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = embeds.double()
    for i in range(lm.num_hidden_layers):
        p = f"model.layers.{i}"
        h = _rms(x, pick(f"{p}.input_layernorm"), lm.rms_norm_eps)
        q = (h @ w[f"{p}.self_attn.q_proj.weight"].T).view(t, heads, d).transpose(0, 1)
        k = multiway_linear(f"{p}.self_attn.k_proj", h).view(t, heads, d).transpose(0, 1)
        v = multiway_linear(f"{p}.self_attn.v_proj", h).view(t, heads, d).transpose(0, 1)
        q, k = _rotate(q, positions, lm.rope_theta), _rotate(k, positions, lm.rope_theta)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~causal, float("-inf"))
        attn = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(t, heads * d)
        x = x + attn @ w[f"{p}.self_attn.o_proj.weight"].T
        h = _rms(x, pick(f"{p}.post_attention_layernorm"), lm.rms_norm_eps)
        gate, up = h @ w[f"{p}.mlp.gate_proj.weight"].T, h @ w[f"{p}.mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[f"{p}.mlp.down_proj.weight"].T
    return _rms(x, w["model.norm.weight"], lm.rms_norm_eps) @ w["lm_head.weight"].T


def test_visual_tokens_take_multiway_1_as_a_float64_decoder_does(model):
    config = model.config
    slots = [2, 5]
    ids = _ids(2, 9, config.language.vocab_size, seed=3)
    for row, slot in enumerate(slots):
        ids[row, slot] = IMAGE_TOKEN_INDEX
    pixels = random_pixels(2, config, seed=4)
    with torch.no_grad():
        ours = model(ids, pixels).logits
        visual = model.encode_images(pixels).double()  # the vision tower and abstractor: test_model_blocks.py
    w = {k: v.double() for k, v in model.state_dict().items()}
    n_vis = model.num_visual_tokens
    for row, slot in enumerate(slots):
        text = w["model.embed_tokens.weight"][ids[row].clamp(min=0)]
        embeds = torch.cat([text[:slot], visual[row], text[slot + 1 :]])
        is_visual = torch.zeros(embeds.shape[0], dtype=torch.bool)
        is_visual[slot : slot + n_vis] = True
        expected = _reference_row(w, embeds, is_visual, config)
        torch.testing.assert_close(ours[row].double(), expected, rtol=1e-4, atol=1e-4)
        # the routing matters: the same tokens all through multiway.0 give other logits
        text_way = _reference_row(w, embeds, torch.zeros_like(is_visual), config)
        assert float((text_way - expected).abs().max()) > 0.05
