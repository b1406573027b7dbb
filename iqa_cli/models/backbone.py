"""The interface every backbone implements, and the mPLUG-Owl2 port behind it.

A backbone turns (images, prompt token ids, optional response ids appended to them) into per-position
logits and hidden states, and knows its own preprocessing, tokenizer and prompt. Scoring and training only
talk to this interface, so later backbones (Qwen2.5-VL, LLaVA, ...) plug in beside mPLUG-Owl2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from iqa_cli.models.mplug_owl2.checkpoints import LoadedCheckpoint
    from iqa_cli.models.mplug_owl2.model import MPLUGOwl2ForCausalLM


@dataclass
class BackboneOutput:
    logits: torch.Tensor | None  # B, P, V at the positions asked for (see Backbone.forward)
    hidden_states: torch.Tensor  # B, L, C after the final norm, over the backbone's own (expanded) sequence
    text_positions: torch.Tensor  # B, T: where each input id landed in that sequence
    last_index: torch.Tensor  # B: each row's last real position in that sequence


@runtime_checkable
class Backbone(Protocol):
    """What scoring and training need from a multimodal LLM."""

    name: str  # e.g. "mplug_owl2"
    image_token: str  # the placeholder a prompt holds once, e.g. "<|image|>"
    tokenizer: Any  # encode/decode/token_to_id/add_tokens, as iqa_cli.models.mplug_owl2.tokenizer.LlamaTokenizer
    preprocessor: Callable[[Any], torch.Tensor]  # PIL image -> pixels [3, S, S]; picklable

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt holding `image_token` once (the backbone's own image slot convention)."""
        ...

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        logits_at: str | torch.Tensor = "last",
    ) -> BackboneOutput:
        """pixels [B, 3, S, S] and ids [B, T] (prompt, then any response) -> logits and hidden states."""
        ...


class MPLUGOwl2Backbone:
    """The mPLUG-Owl2 port as a `Backbone`."""

    name = "mplug_owl2"
    image_token = "<|image|>"

    def __init__(self, model: MPLUGOwl2ForCausalLM, tokenizer: Any, preprocessor: Callable[[Any], torch.Tensor]):
        self.model, self.tokenizer, self.preprocessor = model, tokenizer, preprocessor

    @classmethod
    def from_checkpoint(cls, loaded: LoadedCheckpoint) -> MPLUGOwl2Backbone:
        """Tokenizer and preprocessing from the checkpoint's files (added Q-Scorer tokens included)."""
        from iqa_cli.errors import UserError
        from iqa_cli.images import ClipPreprocessor
        from iqa_cli.models.mplug_owl2.tokenizer import LlamaTokenizer

        if loaded.tokenizer_dir is None:
            raise UserError(f"{loaded.weights_dir}: no tokenizer.model in the checkpoint (or its base)")
        tokenizer = LlamaTokenizer.from_dir(loaded.tokenizer_dir)
        if loaded.added_tokens:
            ids = tokenizer.add_tokens(loaded.added_tokens)
            if ids != loaded.score_token_ids:
                raise UserError(
                    f"{loaded.tokenizer_dir}: adding {loaded.added_tokens} gives ids {ids}, the checkpoint"
                    f" was trained with {loaded.score_token_ids}"
                )
        if loaded.preprocessor_config is not None:
            preprocessor = ClipPreprocessor.from_config(loaded.preprocessor_config)
        else:
            side = loaded.config.vision.image_size
            preprocessor = ClipPreprocessor(size=side, crop_size=(side, side))
        return cls(loaded.model, tokenizer, preprocessor)

    def encode_prompt(self, prompt: str) -> list[int]:
        from iqa_cli.models.mplug_owl2.tokenizer import tokenize_prompt

        return tokenize_prompt(self.tokenizer, prompt)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        logits_at: str | torch.Tensor = "last",
    ) -> BackboneOutput:
        out = self.model(input_ids, pixel_values, attention_mask=attention_mask, logits_at=logits_at)
        return BackboneOutput(out.logits, out.hidden_states, out.text_positions, out.last_index)

    __call__ = forward
