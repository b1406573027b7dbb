"""Each block of the mPLUG-Owl2 port against an independent float64 re-derivation, and the properties of the
assembled forward pass (splice, batching, padding, cache, partial LM head)."""

import math

import numpy as np
import pytest
import torch

from iqa_cli.models.backbone import Backbone
from iqa_cli.models.mplug_owl2.abstractor import VisualAbstractor, abstractor_pos_embeds
from iqa_cli.models.mplug_owl2.backbone import MPLUGOwl2Backbone
from iqa_cli.models.mplug_owl2.language_model import (
    Attention,
    Modality,
    MultiwayLinear,
    MultiwayRMSNorm,
    apply_rope,
    attention_mask,
    rope_cos_sin,
)
from iqa_cli.models.mplug_owl2.model import IMAGE_TOKEN_INDEX
from iqa_cli.models.mplug_owl2.regressor import ScoreRegressor
from iqa_cli.models.mplug_owl2.vision import VisionModel
from tests.factories import random_pixels, tiny_config, tiny_model

F64 = {"dtype": torch.float64}


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, **F64) * (0.3 if p.ndim == 1 else 1 / math.sqrt(p[0].numel())))
            if p.ndim == 1:
                p.add_(1.0)
    return module


def _layer_norm(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def _softmax_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v with an optional boolean mask (True = attend), [.., T, D]."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# --- multiway -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mask", "blocks"])
def test_multiway_norm_equals_each_norm_on_its_own_tokens(kind):
    torch.manual_seed(0)
    norm = _randomize(MultiwayRMSNorm(16, eps=1e-6).double())
    x = torch.randn(3, 10, 16, **F64)
    if kind == "mask":
        is_visual = torch.rand(3, 10) < 0.4
        modality = Modality.from_mask(is_visual)
    else:
        modality = Modality.from_blocks(torch.tensor([0, 3, 6]), 4, 10)
        is_visual = modality.is_visual
    out = norm(x, modality)
    expected = torch.empty_like(x)
    expected[~is_visual] = norm.multiway[0](x[~is_visual])
    expected[is_visual] = norm.multiway[1](x[is_visual])
    torch.testing.assert_close(out, expected)
    w = torch.where(is_visual[..., None], norm.multiway[1].weight, norm.multiway[0].weight)
    torch.testing.assert_close(out, w * x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6))


def test_multiway_blocks_mark_exactly_the_visual_block():
    modality = Modality.from_blocks(torch.tensor([0, 2, 5]), 3, 8)
    expected = torch.zeros(3, 8, dtype=torch.bool)
    expected[0, 0:3] = expected[1, 2:5] = expected[2, 5:8] = True
    assert torch.equal(modality.is_visual, expected)
    general = Modality.from_mask(expected)
    assert torch.equal(modality.text_index, general.text_index)
    assert torch.equal(modality.visual_index, general.visual_index)


def test_multiway_kv_projection_equals_each_projection_on_its_own_tokens():
    proj = _randomize(MultiwayLinear(16, 12, bias=True).double(), seed=1)
    x = torch.randn(2, 9, 16, **F64)
    is_visual = torch.zeros(2, 9, dtype=torch.bool)
    is_visual[0, 2:6] = is_visual[1, 0:3] = True
    out = proj(x, Modality.from_mask(is_visual))
    (w0, b0), (w1, b1) = [(m.weight, m.bias) for m in proj.multiway]
    expected = torch.where(is_visual[..., None], x @ w1.T + b1, x @ w0.T + b0)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(proj(x, Modality.text_only(2, 9)), x @ w0.T + b0)


# --- RoPE and attention --------------------------------------------------------------------------------


def _complex_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotates pair (x_i, x_{i + D/2}) as the complex number x_i + j x_{i+D/2} by angle p * theta^(-2i/D)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, **F64) / d)
    angle = positions.double()[..., None] * freqs  # B, T, D/2
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(torch.ones_like(angle), angle)[:, None]
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_equals_complex_rotation():
    x = torch.randn(2, 3, 7, 16, **F64)  # B, H, T, D
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 9, 40, 2047]])
    cos, sin = rope_cos_sin(positions, 16, 10000.0)
    # angles are float32 as in the reference: at position 2047 that is ~1e-4 rad * 2047 ulp-level error
    torch.testing.assert_close(apply_rope(x, cos, sin), _complex_rope(x, positions, 10000.0), rtol=0, atol=2e-5)
    near = positions[:, :4]
    cos, sin = rope_cos_sin(near, 16, 10000.0)
    torch.testing.assert_close(apply_rope(x[:, :, :4], cos, sin), _complex_rope(x[:, :, :4], near, 10000.0))


def test_rope_preserves_relative_positions():
    """q.k after rotation depends only on the position difference."""
    q, k = torch.randn(1, 1, 1, 32, **F64), torch.randn(1, 1, 1, 32, **F64)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), 32, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), 32, 10000.0)
        return (apply_rope(q, cq.double(), sq.double()) * apply_rope(k, ck.double(), sk.double())).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))


def _manual_attention(attn: Attention, x, is_visual, positions, mask):
    b, t, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    (wk0, wk1), (wv0, wv1) = [(m.multiway[0].weight, m.multiway[1].weight) for m in (attn.k_proj, attn.v_proj)]
    sel = is_visual[..., None]
    q = (x @ attn.q_proj.weight.T).view(b, t, h, d).transpose(1, 2)
    k = torch.where(sel, x @ wk1.T, x @ wk0.T).view(b, t, h, d).transpose(1, 2)
    v = torch.where(sel, x @ wv1.T, x @ wv0.T).view(b, t, h, d).transpose(1, 2)
    q, k = _complex_rope(q, positions, 10000.0), _complex_rope(k, positions, 10000.0)
    out = _softmax_attention(q, k, v, mask[:, None])
    return out.transpose(1, 2).reshape(b, t, h * d) @ attn.o_proj.weight.T


def test_attention_equals_float64_causal_softmax():
    config = tiny_config().language
    attn = _randomize(Attention(config).double(), seed=2)
    x = torch.randn(2, 11, config.hidden_size, **F64)
    is_visual = torch.zeros(2, 11, dtype=torch.bool)
    is_visual[:, 3:7] = True
    positions = torch.arange(11).expand(2, 11)
    rope = rope_cos_sin(positions, config.head_dim, config.rope_theta)
    out, _ = attn(x, Modality.from_mask(is_visual), rope, None, None)
    causal = torch.ones(11, 11, dtype=torch.bool).tril().expand(2, 11, 11)
    torch.testing.assert_close(out, _manual_attention(attn, x, is_visual, positions, causal))


def test_attention_mask_hides_padding_and_future():
    key_padding = torch.tensor([[True, True, True, False], [False, True, True, True]])
    mask = attention_mask(key_padding, 4, 0)[:, 0]
    expected = torch.tensor(
        [
            [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],  # right pad: the pad query also sees itself
            [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]],  # left pad: the pad query sees only itself
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    # with 2 cached positions, query i sits at absolute position 2 + i
    cached = attention_mask(torch.ones(1, 5, dtype=torch.bool), 3, 2)[0, 0]
    assert torch.equal(cached, torch.ones(3, 5, dtype=torch.bool).tril(2))


# --- vision tower and abstractor ------------------------------------------------------------------------


def test_vision_tower_equals_float64_rederivation():
    """conv patches, [cls; patches] + positions, pre-LN, pre-norm blocks with a per-head [q, k, v] fused
    projection and QuickGELU, then the post-LN output (what the abstractor reads)."""
    cfg = tiny_config().vision
    vit = _randomize(VisionModel(cfg).double(), seed=3)
    px = torch.randn(2, 3, cfg.image_size, cfg.image_size, **F64)
    eps, c, h = cfg.layer_norm_eps, cfg.hidden_size, cfg.num_attention_heads
    d, p = c // h, cfg.patch_size
    emb = vit.embeddings
    # patches by explicit unfolding: patch (i, j) in row-major order, channels-major inside a patch
    g = cfg.image_size // p
    patches = px.reshape(2, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(2, g * g, 3 * p * p)
    x = patches @ emb.patch_embed.weight.reshape(c, -1).T
    x = torch.cat([emb.cls_token.expand(2, 1, c), x], 1) + emb.position_embedding
    x = _layer_norm(x, emb.pre_layernorm.weight, emb.pre_layernorm.bias, eps)
    for layer in vit.encoder.layers:
        y = _layer_norm(x, layer.input_layernorm.weight, layer.input_layernorm.bias, eps)
        w, bias = layer.self_attn.query_key_value.weight, layer.self_attn.query_key_value.bias
        heads = []
        for head in range(h):
            rows = slice(3 * head * d, 3 * head * d + 3 * d)
            qkv = y @ w[rows].T + bias[rows]
            heads.append(_softmax_attention(qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]))
        x = x + torch.cat(heads, -1) @ layer.self_attn.dense.weight.T + layer.self_attn.dense.bias
        y = _layer_norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.bias, eps)
        y = y @ layer.mlp.fc1.weight.T + layer.mlp.fc1.bias
        y = y * torch.sigmoid(1.702 * y)
        x = x + y @ layer.mlp.fc2.weight.T + layer.mlp.fc2.bias
    x = _layer_norm(x, vit.post_layernorm.weight, vit.post_layernorm.bias, eps)
    torch.testing.assert_close(vit(px), x)


def _mae_sincos_tables(dim: int, grid: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """The MAE recipe the reference uses, in float64 numpy: meshgrid(w, h) puts the column index first."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    table = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    k_pos = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return one_d(dim, np.arange(queries, dtype=np.float64)), k_pos


def test_abstractor_position_tables_match_the_mae_recipe():
    cfg = tiny_config().abstractor
    q_pos, k_pos = abstractor_pos_embeds(cfg)
    q_ref, k_ref = _mae_sincos_tables(cfg.hidden_size, cfg.grid_size, cfg.num_learnable_queries)
    assert k_pos.shape == (1 + cfg.grid_size**2, cfg.hidden_size)
    np.testing.assert_allclose(q_pos.numpy(), q_ref, atol=1e-6)
    np.testing.assert_allclose(k_pos.numpy(), k_ref, atol=1e-6)
    seven_b = tiny_config().abstractor.__class__()  # 7B: 64 queries, 32 x 32 grid, width 1024
    q7, k7 = abstractor_pos_embeds(seven_b)
    q7_ref, k7_ref = _mae_sincos_tables(1024, 32, 64)
    np.testing.assert_allclose(q7.numpy(), q7_ref, atol=2e-5)
    np.testing.assert_allclose(k7.numpy(), k7_ref, atol=2e-5)


def test_abstractor_output_shape_and_float64_rederivation():
    config = tiny_config()
    cfg = config.abstractor
    abstractor = VisualAbstractor(cfg, config.language.hidden_size).double()
    _randomize(abstractor, seed=4)
    image = torch.randn(2, config.vision.num_positions, cfg.hidden_size, **F64)
    out = abstractor(image)
    assert out.shape == (2, cfg.num_learnable_queries + 1, config.language.hidden_size)
    torch.testing.assert_close(out[:, -1], abstractor.vit_eos[0].expand(2, -1))

    q_ref, k_ref = (
        torch.from_numpy(t) for t in _mae_sincos_tables(cfg.hidden_size, cfg.grid_size, cfg.num_learnable_queries)
    )
    h = cfg.num_attention_heads
    d = cfg.hidden_size // h
    x = abstractor.query_embeds.expand(2, -1, -1)
    for layer in abstractor.encoder.layers:
        blk = layer.crossattention
        att, outp, mlp = blk.attention, blk.output, blk.output.mlp
        q_in = _layer_norm(x, blk.norm1.weight, blk.norm1.bias, 1e-5)  # torch's default eps
        kv = torch.cat([q_in, _layer_norm(image, blk.normk.weight, blk.normk.bias, 1e-5)], 1)
        query = (q_in + q_ref) @ att.query.weight.T + att.query.bias
        key = (kv + torch.cat([q_ref, k_ref])) @ att.key.weight.T + att.key.bias
        value = kv @ att.value.weight.T + att.value.bias
        ctx = torch.cat(
            [
                _softmax_attention(
                    query[..., i * d : (i + 1) * d], key[..., i * d : (i + 1) * d], value[..., i * d : (i + 1) * d]
                )
                for i in range(h)
            ],
            -1,
        )
        x = q_in + ctx @ outp.out_proj.weight.T + outp.out_proj.bias  # residual from the normed queries
        n = _layer_norm(x, outp.norm2.weight, outp.norm2.bias, 1e-5)
        gate = n @ mlp.w1.weight.T + mlp.w1.bias
        hidden = gate * torch.sigmoid(gate) * (n @ mlp.w3.weight.T + mlp.w3.bias)
        hidden = _layer_norm(hidden, mlp.ffn_ln.weight, mlp.ffn_ln.bias, cfg.layer_norm_eps)
        x = x + hidden @ mlp.w2.weight.T + mlp.w2.bias
    expected = x @ abstractor.visual_fc.weight.T + abstractor.visual_fc.bias
    torch.testing.assert_close(out[:, :-1], expected)


def test_regressor_residual_relu_blocks():
    reg = _randomize(ScoreRegressor(8, [8, 4]).double(), seed=5)
    x = torch.randn(5, 8, **F64)
    b0, b1 = reg.model[0].linear, reg.model[1].linear
    y = torch.relu(x @ b0.weight.T + b0.bias) + x  # 8 -> 8: residual
    y = torch.relu(y @ b1.weight.T + b1.bias)  # 8 -> 4: none
    expected = (y @ reg.output_layer.weight.T + reg.output_layer.bias)[:, 0]
    torch.testing.assert_close(reg(x), expected)
    assert list(dict(reg.named_parameters())) == [
        "model.0.linear.weight",
        "model.0.linear.bias",
        "model.1.linear.weight",
        "model.1.linear.bias",
        "output_layer.weight",
        "output_layer.bias",
    ]


# --- the assembled model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def _prompt(slot: int, length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (length,), generator=gen).tolist()
    ids[0] = 1
    ids[slot] = IMAGE_TOKEN_INDEX
    return ids


def test_splice_puts_visual_tokens_at_the_slot_and_text_around_it(model):
    ids = torch.tensor([_prompt(3, 9, 0), _prompt(6, 9, 1)])
    px = random_pixels(2, model.config)
    captured = {}

    def hook(module, args):
        captured["x"], captured["modality"] = args[0], args[1]

    handle = model.model.layers[0].register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            out = model(ids, px)
    finally:
        handle.remove()
    x, modality = captured["x"], captured["modality"]
    n_vis = model.num_visual_tokens
    assert n_vis == model.config.abstractor.num_learnable_queries + 1
    assert x.shape == (2, 9 - 1 + n_vis, model.config.language.hidden_size)
    with torch.no_grad():
        visual = model.encode_images(px)
        text = model.model.embed_tokens(ids.clamp(min=0))
    for row, slot in enumerate([3, 6]):
        torch.testing.assert_close(x[row, :slot], text[row, :slot])
        torch.testing.assert_close(x[row, slot : slot + n_vis], visual[row])
        torch.testing.assert_close(x[row, slot + n_vis :], text[row, slot + 1 :])
        assert modality.is_visual[row].nonzero().squeeze(1).tolist() == list(range(slot, slot + n_vis))
        positions = out.text_positions[row].tolist()
        assert positions == [*range(slot), slot, *range(slot + n_vis, 9 - 1 + n_vis)]


def test_rows_do_not_depend_on_each_other(model):
    a, b = _prompt(3, 9, 0), _prompt(6, 9, 1)
    px = random_pixels(2, model.config, seed=3)
    with torch.no_grad():
        both = model(torch.tensor([a, b]), px).logits
        alone = model(torch.tensor([a]), px[:1]).logits
        other = model(torch.tensor([b]), px[1:]).logits
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], other[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_real_tokens(model, side):
    short, long = _prompt(2, 6, 4), _prompt(4, 10, 5)
    pad = [0] * (len(long) - len(short))
    padded = short + pad if side == "right" else pad + short
    mask = [1] * len(short) + [0] * len(pad) if side == "right" else [0] * len(pad) + [1] * len(short)
    px = random_pixels(2, model.config, seed=6)
    with torch.no_grad():
        batch = model(torch.tensor([padded, long]), px, attention_mask=torch.tensor([mask, [1] * len(long)]))
        alone = model(torch.tensor([short]), px[:1])
        long_alone = model(torch.tensor([long]), px[1:])
        last = model(
            torch.tensor([padded, long]), px, attention_mask=torch.tensor([mask, [1] * len(long)]), logits_at="last"
        )
    real = batch.attention_mask[0]
    assert int(real.sum()) == alone.logits.shape[1]
    torch.testing.assert_close(batch.logits[0][real], alone.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.logits[1], long_alone.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last.logits[0, 0], alone.logits[0, -1], rtol=1e-5, atol=1e-5)
    shift = len(pad) if side == "left" else 0  # left pads come first in the expanded sequence too
    real_positions = batch.text_positions[0][torch.tensor(mask, dtype=torch.bool)]
    assert (real_positions - shift).tolist() == alone.text_positions[0].tolist()


def test_cached_decoding_step_equals_full_recompute(model):
    prompts = [[*_prompt(2, 6, 7), 0, 0], _prompt(3, 8, 8)]
    mask = torch.tensor([[1] * 6 + [0, 0], [1] * 8])
    px = random_pixels(2, model.config, seed=9)
    with torch.no_grad():
        first = model(torch.tensor(prompts), px, attention_mask=mask, use_cache=True, logits_at="last")
        next_ids = first.logits[:, 0].argmax(-1)
        step = model(next_ids[:, None], past_key_values=first.past_key_values, use_cache=True, logits_at="all")
        for row, real in enumerate([6, 8]):
            full = model(torch.tensor([[*prompts[row][:real], int(next_ids[row])]]), px[row : row + 1])
            torch.testing.assert_close(step.logits[row, 0], full.logits[0, -1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step.hidden_states[row, 0], full.hidden_states[0, -1], rtol=1e-5, atol=1e-5)
    assert step.past_key_values.seq_len == first.past_key_values.seq_len + 1
    assert step.past_key_values.next_position.tolist() == [
        6 - 1 + model.num_visual_tokens + 1,
        8 - 1 + model.num_visual_tokens + 1,
    ]


def test_logits_at_last_and_positions_equal_rows_of_all(model):
    ids = torch.tensor([_prompt(3, 9, 10), _prompt(5, 9, 11)])
    px = random_pixels(2, model.config, seed=12)
    with torch.no_grad():
        full = model(ids, px)
        last = model(ids, px, logits_at="last")
        some = model(ids, px, logits_at=torch.tensor([[0, 5], [7, 2]]))
        none = model(ids, px, logits_at="none")
    assert last.logits.shape == (2, 1, model.config.language.vocab_size)
    torch.testing.assert_close(last.logits[:, 0], full.logits[:, -1])
    torch.testing.assert_close(some.logits[0], full.logits[0, [0, 5]])
    torch.testing.assert_close(some.logits[1], full.logits[1, [7, 2]])
    assert none.logits is None
    torch.testing.assert_close(none.hidden_states, full.hidden_states)


def test_image_slot_errors(model):
    px = random_pixels(1, model.config)
    with pytest.raises(ValueError, match="exactly one image slot"):
        model(torch.tensor([[1, 5, 6]]), px)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(torch.tensor([[1, IMAGE_TOKEN_INDEX, 6]]))


def test_resize_token_embeddings_appends_mean_rows():
    model = tiny_model(seed=1)
    old_embed = model.model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(old_embed.shape[0] + 5)
    assert model.config.language.vocab_size == old_embed.shape[0] + 5
    torch.testing.assert_close(model.model.embed_tokens.weight[:-5], old_embed)
    torch.testing.assert_close(model.lm_head.weight[:-5], old_head)
    torch.testing.assert_close(model.model.embed_tokens.weight[-5:], old_embed.mean(0).expand(5, -1))
    torch.testing.assert_close(model.lm_head.weight[-5:], old_head.mean(0).expand(5, -1))
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, old_embed.shape[0] + 2]])
    assert model(ids, random_pixels(1, model.config)).logits.shape[-1] == old_embed.shape[0] + 5


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.tensor([_prompt(2, 7, 13)])
    px = random_pixels(1, tiny_config(), seed=14)
    grads = []
    for enabled in (False, True):
        model = tiny_model(seed=2).train()
        model.set_gradient_checkpointing(enabled)
        model(ids, px).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_bfloat16_runs_close_to_float32(model):
    ids = torch.tensor([_prompt(3, 9, 15)])
    px = random_pixels(1, model.config, seed=16)
    low = tiny_model(seed=0).to(torch.bfloat16)
    with torch.no_grad():
        ref = torch.log_softmax(model(ids, px, logits_at="last").logits.float(), -1)
        out = torch.log_softmax(low(ids, px, logits_at="last").logits.float(), -1)
    assert low.lm_head.weight.dtype == torch.bfloat16
    assert (out - ref).abs().max() < 0.25


def test_mplug_owl2_implements_the_backbone_interface(model):
    backbone = MPLUGOwl2Backbone(model, tokenizer=None, preprocessor=lambda image: image)
    assert isinstance(backbone, Backbone)
    ids = torch.tensor([_prompt(3, 9, 17)])
    px = random_pixels(1, model.config, seed=18)
    with torch.no_grad():
        out = backbone.forward({"pixel_values": px}, ids)
        ref = model(ids, px, logits_at="last")
    torch.testing.assert_close(out.logits, ref.logits)
    assert out.last_index.tolist() == [9 - 1 + model.num_visual_tokens - 1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    """SDPA kernels, masks and the multiway routing on the GPU give the CPU's numbers."""
    ids = torch.tensor([_prompt(3, 9, 19), [0, 0, *_prompt(2, 7, 20)]])
    mask = torch.tensor([[1] * 9, [0, 0] + [1] * 7])
    px = random_pixels(2, tiny_config(), seed=21)
    cpu = tiny_model(seed=0)
    gpu = tiny_model(seed=0).to("cuda", dtype)
    from iqa_cli.scoring.scorer import exact_float32

    exact_float32(dtype)  # as Scorer.from_pretrained does: no TF32 in the patch convolution under float32
    with torch.no_grad():
        ref = cpu(ids, px, attention_mask=mask, logits_at="last").logits
        out = gpu(ids.cuda(), px.cuda(), attention_mask=mask.cuda(), logits_at="last").logits.float().cpu()
    tol = 1e-4 if dtype == torch.float32 else 0.3
    torch.testing.assert_close(torch.log_softmax(out, -1), torch.log_softmax(ref, -1), rtol=0, atol=tol)
