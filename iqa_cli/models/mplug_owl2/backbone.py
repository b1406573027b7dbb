"""mPLUG-Owl2 as a `Backbone`: the registry's `load`, the CLIP transform and collate, the -200 image slot.

Everything scoring needs from this family goes through `MPLUGOwl2Backbone`; the released checkpoints' own
conventions (Q-Scorer's appended-token readout, the evaluation prompt) are decided here, not in scoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from iqa_cli.batch_buffer import batch_buffer
from iqa_cli.errors import UserError
from iqa_cli.models.backbone import BackboneOutput, Family, Provenance, VisualInputs
from iqa_cli.models.mplug_owl2.tokenizer import (
    DEFAULT_PROMPT,
    IMAGE_TOKEN,
    QUICKSTART_PROMPT,
    level_token_ids,
    tokenize_prompt,
)

if TYPE_CHECKING:
    from iqa_cli.models.mplug_owl2.checkpoints import LoadedCheckpoint
    from iqa_cli.models.mplug_owl2.model import MPLUGOwl2ForCausalLM

PIXELS = "pixel_values"  # the one visual input: CLIP-normalized squares [3, S, S] per image


@dataclass(frozen=True)
class ClipTransform:
    """RGB PIL image -> {"pixel_values": [3, S, S]}; picklable for DataLoader workers."""

    preprocessor: Any  # ClipPreprocessor, or any image -> [3, S, S] callable

    def __call__(self, image: Any) -> dict[str, torch.Tensor]:
        return {PIXELS: self.preprocessor(image)}


@dataclass(frozen=True)
class SquareCollate:
    """Stacks per-image pixels into one [batch_size, 3, S, S] buffer (shared memory in a worker); rows without
    an image are zeros. Pixels are cast to `dtype` here, in the worker: the same rounding the model's own cast
    would do, and half the bytes to pin and copy for 16-bit models."""

    image_size: int

    def __call__(
        self, items: list[VisualInputs | None], batch_size: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        s = self.image_size
        pixels = batch_buffer((batch_size, 3, s, s), dtype)
        filled = torch.zeros(batch_size, dtype=torch.bool)
        for row, item in enumerate(items):
            if item is not None:
                pixels[row] = item[PIXELS]
                filled[row] = True
        pixels[~filled] = 0
        return {PIXELS: pixels}


class MPLUGOwl2Backbone:
    """The mPLUG-Owl2 port as a `Backbone`."""

    name = "mplug_owl2"
    image_token = IMAGE_TOKEN

    def __init__(
        self,
        model: MPLUGOwl2ForCausalLM,
        tokenizer: Any,
        preprocessor: Any,
        *,
        score_token_ids: list[int] | None = None,
        provenance: Provenance | None = None,
        checkpoint: LoadedCheckpoint | None = None,
    ):
        self.model, self.tokenizer, self.preprocessor = model, tokenizer, preprocessor
        self.score_token_ids = list(score_token_ids or [])  # Q-Scorer's <score1>..<scoreK>, ascending quality
        self.provenance = provenance or Provenance(model="")
        self.checkpoint = checkpoint  # the loaded files (training reads layout, tokenizer and base from it)
        self.transform = ClipTransform(preprocessor)
        side = getattr(preprocessor, "image_size", None) or model.config.vision.image_size
        self.collate = SquareCollate(side)

    @classmethod
    def from_checkpoint(cls, loaded: LoadedCheckpoint) -> MPLUGOwl2Backbone:
        """Tokenizer and preprocessing from the checkpoint's files (added Q-Scorer tokens included)."""
        from iqa_cli.models.mplug_owl2.preprocess import ClipPreprocessor
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
        provenance = Provenance(
            model=loaded.repo_id or str(loaded.weights_dir.resolve()),
            revision=loaded.revision or "",
            layout=loaded.layout,
            weights_dir=loaded.weights_dir,
            base_model=(loaded.base_repo_id or str(loaded.base_dir.resolve())) if loaded.base_dir else "",
            base_revision=loaded.base_revision or "",
        )
        return cls(
            loaded.model,
            tokenizer,
            preprocessor,
            score_token_ids=loaded.score_token_ids,
            provenance=provenance,
            checkpoint=loaded,
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def has_regressor(self) -> bool:
        return self.model.deepmlp is not None

    def default_scoring(self) -> tuple[str, list[int], str | None]:
        if self.score_token_ids:  # the released Q-Scorer layout: scored as its authors do (DESIGN.md, "Q-Scorer")
            return QUICKSTART_PROMPT, list(self.score_token_ids), "appended" if self.has_regressor else None
        return DEFAULT_PROMPT, [], "last" if self.has_regressor else None

    def encode_prompt(self, prompt: str) -> list[int]:
        return tokenize_prompt(self.tokenizer, prompt)

    def level_token_id(self, word: str) -> int:
        added = self.tokenizer.added_tokens
        if word in added:
            return added[word]
        return level_token_ids(self.tokenizer, [word])[0]

    def forward(
        self,
        visual: VisualInputs,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        logits_at: str | torch.Tensor = "last",
        use_cache: bool = False,
    ) -> BackboneOutput:
        pixels = visual[PIXELS].to(device=self.model.device, dtype=self.model.dtype, non_blocking=True)
        out = self.model(input_ids, pixels, attention_mask=attention_mask, logits_at=logits_at, use_cache=use_cache)
        return BackboneOutput(out.logits, out.hidden_states, out.text_positions, out.last_index, out.past_key_values)

    __call__ = forward

    def decode_step(self, input_ids: torch.Tensor, past_key_values: Any) -> BackboneOutput:
        out = self.model(input_ids, past_key_values=past_key_values, logits_at="last")
        return BackboneOutput(out.logits, out.hidden_states, out.text_positions, out.last_index, out.past_key_values)

    def regress(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.deepmlp(hidden)


def load(
    model: str | Path,
    *,
    base: str | Path | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> MPLUGOwl2Backbone:
    """The registry's entry point: a released or `iqa train`-written checkpoint as a `Backbone`."""
    from iqa_cli.models.mplug_owl2.checkpoints import load_mplug_owl2

    loaded = load_mplug_owl2(model, base=base, revision=revision, dtype=dtype, device=device)
    return MPLUGOwl2Backbone.from_checkpoint(loaded)


def wrap(model: MPLUGOwl2ForCausalLM) -> MPLUGOwl2Backbone:
    """An already built model as a `Backbone` for forward passes only (no tokenizer or preprocessing)."""
    return MPLUGOwl2Backbone(model, tokenizer=None, preprocessor=None)


FAMILY = Family(name=MPLUGOwl2Backbone.name, image_token=IMAGE_TOKEN, load=load, wrap=wrap)
