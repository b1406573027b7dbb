"""mPLUG-Owl2 assembled: ViT -> visual abstractor -> tokens spliced into a modality-adaptive LLaMA-2.

State-dict keys are exactly the released ones (`model.embed_tokens.weight`, `model.layers.N...`,
`model.norm.weight`, `model.vision_model...`, `model.visual_abstractor...`, `lm_head.weight`, and
`deepmlp.*` for Q-Scorer), so released checkpoints load without renaming.

Each prompt row holds one image slot (-200). The slot is replaced by the image's Q + 1 visual tokens
(abstractor queries + `vit_eos`; 65 for the 7B model), which use the multiway index 1; everything else is
text (index 0), padding included, as in the reference's `prepare_inputs_labels_for_multimodal`.

A video is F frames in the one slot: the reference (Q-Align's `QAlignVideoScorer`, `images=[frames]`) encodes the
frames as a batch and flattens their tokens into one sequence of F x (Q + 1) (`x.flatten(0, 1)`), frame after
frame, each with its own `vit_eos`. Here pixels [B, F, 3, S, S] do that for every row; rows with fewer real frames
(`frame_counts`, a training batch mixing clips and images) mask their padding frames' tokens out, which neither
attend nor advance the RoPE positions, so a row's tokens see exactly its own frames.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from iqa_cli.models.mplug_owl2.abstractor import VisualAbstractor
from iqa_cli.models.mplug_owl2.config import MPLUGOwl2Config
from iqa_cli.models.mplug_owl2.language_model import KVCache, LlamaMultiwayModel, Modality
from iqa_cli.models.mplug_owl2.regressor import ScoreRegressor
from iqa_cli.models.mplug_owl2.vision import VisionModel

IMAGE_TOKEN_INDEX = (
    -200
)  # the image slot in prompt ids (same value as iqa_cli.models.mplug_owl2.tokenizer.IMAGE_TOKEN_INDEX)


@dataclass
class MPLUGOwl2Output:
    """What one forward pass returns; L is the expanded length (T - 1 + visual tokens with an image)."""

    logits: torch.Tensor | None  # B, L, V ("all") | B, 1, V ("last") | B, P, V (positions) | None ("none")
    hidden_states: torch.Tensor  # B, L, C after the final RMSNorm
    past_key_values: KVCache | None  # the cache, when use_cache=True
    text_positions: torch.Tensor  # B, T: where each input token landed in the expanded sequence (slot: first visual)
    attention_mask: torch.Tensor | None  # B, L: the input mask in expanded coordinates (None if none was given)
    last_index: torch.Tensor  # B: position of each row's last real token in the expanded sequence


class MPLUGOwl2Model(LlamaMultiwayModel):
    """`model.*`: the LLM parts plus `vision_model` and `visual_abstractor`."""

    def __init__(self, config: MPLUGOwl2Config):
        super().__init__(config.language)
        self.vision_model = VisionModel(config.vision)
        self.visual_abstractor = VisualAbstractor(config.abstractor, config.language.hidden_size)


class MPLUGOwl2ForCausalLM(nn.Module):
    def __init__(self, config: MPLUGOwl2Config):
        super().__init__()
        config.validate()
        self.config = config
        self.model = MPLUGOwl2Model(config)
        self.lm_head = nn.Linear(config.language.hidden_size, config.language.vocab_size, bias=False)
        self.deepmlp = (
            ScoreRegressor(config.language.hidden_size, config.deepmlp_hidden_dims)
            if config.deepmlp_hidden_dims
            else None
        )

    @property
    def num_visual_tokens(self) -> int:
        """LLM tokens per image (abstractor queries + vit_eos)."""
        return self.config.num_visual_tokens

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> visual tokens [B, Q + 1, C] in the LLM's width."""
        weight = self.model.vision_model.embeddings.patch_embed.weight
        image = self.model.vision_model(pixel_values.to(device=weight.device, dtype=weight.dtype))
        return self.model.visual_abstractor(image)

    def encode_visual(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] (an image per row) or [B, F, 3, S, S] (F frames per row) -> [B, F (Q + 1), C]: each
        row's frames' tokens one after the other (the reference's `flatten(0, 1)` of a video's frames)."""
        if pixel_values.dim() == 4:
            return self.encode_images(pixel_values)
        b, f = pixel_values.shape[:2]
        tokens = self.encode_images(pixel_values.flatten(0, 1))  # B F, Q + 1, C
        return tokens.reshape(b, f * tokens.shape[1], tokens.shape[2])

    def visual_length(self, pixel_values: torch.Tensor) -> int:
        """Tokens the slot expands to for these pixels: Q + 1 per image, F (Q + 1) per row of F frames."""
        frames = pixel_values.shape[1] if pixel_values.dim() == 5 else 1
        return frames * self.num_visual_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_at: str | torch.Tensor = "all",
        frame_counts: torch.Tensor | None = None,
    ) -> MPLUGOwl2Output:
        """Runs prompts [B, T] (one -200 per row when `pixel_values` [B, 3, S, S] or frames [B, F, 3, S, S] are
        given; `frame_counts` [B]: how many of a row's F frames are real, the others masked out).

        `attention_mask` [B, T] marks real tokens (right or left padding). With `past_key_values` the ids
        are the next tokens only (no image). `logits_at` picks where the LM head runs: "all", "last" (each
        row's last real token), "none", or positions [B, P] in the expanded sequence.
        """
        b, t = input_ids.shape
        is_slot = input_ids == IMAGE_TOKEN_INDEX
        checked = input_ids.device.type != "meta"  # shape-only runs on the meta device cannot inspect ids
        text_embeds = self.model.embed_tokens(input_ids.masked_fill(is_slot, 0))  # B, T, C
        if pixel_values is not None:
            if past_key_values is not None:
                raise ValueError("images go into the first pass only, not into a cached decoding step")
            if pixel_values.shape[0] != b:
                raise ValueError(f"{pixel_values.shape[0]} images for {b} prompt rows")
            if checked and not bool((is_slot.sum(1) == 1).all()):
                raise ValueError(f"every prompt row needs exactly one image slot ({IMAGE_TOKEN_INDEX})")
            slot = is_slot.long().argmax(1)  # B
            visual = self.encode_visual(pixel_values).to(text_embeds.dtype)  # B, V, C
            n_vis = visual.shape[1]
            source = splice_index(slot, t, n_vis)  # B, L into [text ; visual]
            embeds = gather_rows(torch.cat([text_embeds, visual], dim=1), source)
            padding = None
            if attention_mask is not None or frame_counts is not None:
                mask = attention_mask.to(torch.bool) if attention_mask is not None else torch.ones_like(is_slot)
                slot_mask = mask.gather(1, slot[:, None]).expand(b, n_vis)
                if frame_counts is not None:  # a row's padding frames: masked like padding tokens
                    real = frame_counts.to(slot.device)[:, None] * self.num_visual_tokens
                    slot_mask = slot_mask & (torch.arange(n_vis, device=slot.device)[None] < real)
                padding = gather_rows(torch.cat([mask, slot_mask], dim=1)[..., None], source)[..., 0]
            modality = Modality.from_blocks(slot, n_vis, t - 1 + n_vis)
            text_positions = expanded_positions(slot, t, n_vis)
        else:
            if checked and bool(is_slot.any()):
                raise ValueError(f"prompt ids hold an image slot ({IMAGE_TOKEN_INDEX}) but no pixel_values were given")
            embeds = text_embeds
            padding = attention_mask.to(torch.bool) if attention_mask is not None else None
            modality = Modality.text_only(b, t, input_ids.device)
            text_positions = torch.arange(t, device=input_ids.device).expand(b, t)

        hidden, cache = self.model.decode(embeds, modality, padding=padding, past=past_key_values, use_cache=use_cache)
        last = last_real_index(padding, hidden.shape[1], b, hidden.device)
        if isinstance(logits_at, torch.Tensor):
            logits = self.lm_head(gather_rows(hidden, logits_at.to(hidden.device)))
        elif logits_at == "all":
            logits = self.lm_head(hidden)
        elif logits_at == "last":
            logits = self.lm_head(gather_rows(hidden, last[:, None]))
        elif logits_at == "none":
            logits = None
        else:
            raise ValueError(f"logits_at must be 'all', 'last', 'none' or a LongTensor, not {logits_at!r}")
        return MPLUGOwl2Output(logits, hidden, cache, text_positions, padding, last)

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grows or shrinks embed_tokens and lm_head; new rows are the mean of the existing rows."""
        embed = self.model.embed_tokens.weight
        self.model.embed_tokens = nn.Embedding.from_pretrained(
            _resized_rows(embed.detach(), vocab_size), freeze=not embed.requires_grad
        )
        head = self.lm_head.weight
        self.lm_head = nn.Linear(head.shape[1], vocab_size, bias=False, device=head.device, dtype=head.dtype)
        self.lm_head.weight = nn.Parameter(_resized_rows(head.detach(), vocab_size), requires_grad=head.requires_grad)
        self.config.language.vocab_size = vocab_size

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recomputes each ViT, abstractor and decoder layer in backward (training only)."""
        self.model.gradient_checkpointing = enabled
        self.model.vision_model.encoder.gradient_checkpointing = enabled
        self.model.visual_abstractor.encoder.gradient_checkpointing = enabled


def _resized_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    old = weight.shape[0]
    if rows <= old:
        return weight[:rows].clone()
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - old, -1)], dim=0).contiguous()


def splice_index(slot: torch.Tensor, length: int, n_visual: int) -> torch.Tensor:
    """For each expanded position p of rows [B, T - 1 + V], its row in [text (T) ; visual (V)].

    Before the slot s: text p; the block [s, s + V): visual p - s; after it: text p - V + 1.
    """
    p = torch.arange(length - 1 + n_visual, device=slot.device)[None]  # 1, L
    s = slot[:, None]
    return torch.where(p < s, p, torch.where(p < s + n_visual, length + p - s, p - n_visual + 1))


def expanded_positions(slot: torch.Tensor, length: int, n_visual: int) -> torch.Tensor:
    """Where input token t of each row lands: t before the slot, s for the slot, t + V - 1 after it; B, T."""
    t = torch.arange(length, device=slot.device)[None]
    s = slot[:, None]
    return torch.where(t <= s, t, t + n_visual - 1).expand(slot.shape[0], length)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], index [B, P] -> x[b, index[b, p]] as [B, P, C] (one flat index_select, no [B, P, C] index)."""
    b, n, c = x.shape
    flat = (index + n * torch.arange(b, device=index.device)[:, None]).reshape(-1)
    return x.reshape(b * n, c).index_select(0, flat).view(b, index.shape[1], c)


def last_real_index(padding: torch.Tensor | None, length: int, batch: int, device: torch.device) -> torch.Tensor:
    """Position of each row's last real token (right or left padding); B."""
    if padding is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    return length - 1 - padding.flip(1).long().argmax(1)


def build_skeleton(config: MPLUGOwl2Config) -> MPLUGOwl2ForCausalLM:
    """The model with meta tensors (shapes only), for `load_state_dict(assign=True)`.

    No initializer runs: on meta they compute nothing, and torch's meta kernels for `normal_`/`arange` import
    torch._dynamo, about 1 s of every `iqa score` start (0.06 s without them).
    """
    with torch.device("meta"), _initializers_skipped():
        return MPLUGOwl2ForCausalLM(config)


@contextmanager
def _initializers_skipped() -> Iterator[None]:
    """torch.nn.init's in-place initializers as no-ops (modules' reset_parameters look them up at call time)."""
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, _leave_as_is)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def _leave_as_is(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor
