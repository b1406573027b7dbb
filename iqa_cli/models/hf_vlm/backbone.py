"""A transformers vision-language model as a `Backbone`: the class (its forward and the splice of the image
slot), the registry's `load` and `FAMILIES`. Concerns live beside it: `preprocess.py` (transform, collate, pixel
options), `prompt.py` (chat template, level tokens), `generation.py` (greedy decoding of reasoning models),
`training.py` (`iqa train` hooks), `checkpoints.py` (checks, save, adapter merge).

The image slot: the prompt holds the processor's image token once; the transform runs the family's own processor
on that token alone with the image, which gives the image's pixel tensors and the ids the token expands to (e.g.
256 `<|image_pad|>` for a 448x448 Qwen2-VL input, or Idefics3's crop grid with its row/column tokens). `forward`
splices those ids into the prompt, so the model sees exactly what `processor(text=prompt, images=[image])` gives.
A video goes into the same slot: the video transform runs the processor's video input on the video token alone
(`<|video_pad|>` x its patches for Qwen2/2.5-VL, LLaVA-OneVision's `<video>` tokens) or, for Idefics3, the frames
as images, and those ids replace the slot as an image's do; the prompt asks about "this video". Qwen3-VL's video
token expands to `<t seconds><|vision_start|>` pads `<|vision_end|>` per temporal patch, and its processor drops
the template's own start/end pair around the token: those ids replace the slot with the pair around it.
Rows of a batch with different expansions are right-padded: causal attention keeps a row's real tokens from ever
seeing the padding after them and their positions do not move, so a score does not depend on its batch-mates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from iqa_cli.constants import DEFAULT_QUESTION
from iqa_cli.errors import UserError
from iqa_cli.models import hub
from iqa_cli.models.backbone import BackboneOutput, Family, ModuleBackbone, Provenance, VisualInputs
from iqa_cli.models.hf_vlm import IMAGE_TOKENS, LORA_TARGETS, PATCH_GRID_FAMILIES, VIDEO_MODES
from iqa_cli.models.hf_vlm.checkpoints import (
    ADAPTER_CONFIG,
    OUTPUT_FILES,
    REGRESSOR_ATTR,
    REGRESSOR_FILE,
    CheckpointMixin,
    _adapter_base,
    _check_config,
    _check_processor,
    _merge_adapter,
    _quiet_transformers,
    _trained_pixels,
)
from iqa_cli.models.hf_vlm.generation import GenerationMixin
from iqa_cli.models.hf_vlm.preprocess import (
    FLAT_PIXELS,
    GRID,
    HAS_IMAGE,
    IMAGE_IDS,
    OWN_MARKERS,
    TOKEN_TYPES,
    VIDEO_GRID,
    VIDEO_PIXELS,
    VIDEO_TIMES,
    PaddedCollate,
    ProcessorTransform,
    VideoTransform,
    anyres_tensor_inputs,
    patch_grid_tensor_inputs,
    pixel_options,
    tensor_collate,
)
from iqa_cli.models.hf_vlm.prompt import PromptMixin
from iqa_cli.models.hf_vlm.training import TrainingMixin


class HFVisionLanguageBackbone(ModuleBackbone, PromptMixin, GenerationMixin, TrainingMixin, CheckpointMixin):
    """A transformers `*ForConditionalGeneration` vision-language model and its processor as a `Backbone`."""

    lora_targets = LORA_TARGETS

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        provenance: Provenance | None = None,
        images_kwargs: dict | None = None,
        source: str = "",
    ):
        self.model, self.processor = model, processor
        self.name = model.config.model_type
        self.tokenizer = processor.tokenizer
        self.preprocessor = processor.image_processor
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.provenance = provenance or Provenance(model=source)
        self.source = source or self.provenance.model
        self.flat = self.name in PATCH_GRID_FAMILIES
        self.images_kwargs = dict(images_kwargs or {})
        self.transform = ProcessorTransform(processor, self.image_token, self.flat, self.images_kwargs)
        self.collate = PaddedCollate()
        mode = VIDEO_MODES.get(self.name)
        timestamps = self.name == "qwen3_vl"  # a timestamp and a vision start/end pair per temporal patch
        videos_kwargs = {"cap_pixels_per_frame": True} if timestamps else {}
        self.video_transform = (
            VideoTransform(processor, self.image_token, self.flat, mode, self.images_kwargs, videos_kwargs, timestamps)
            if mode
            else None
        )
        # the vision start/end pair around the slot that a video with its own pairs replaces (Qwen3-VL)
        markers = (processor.vision_start_token, processor.vision_end_token) if timestamps else ()
        self.slot_markers = tuple(self.tokenizer.convert_tokens_to_ids(t) for t in markers) or None
        self.video_collate = self.collate
        self.score_token_ids: list[int] = list(getattr(model.config, "score_token_ids", None) or [])
        _check_processor(processor, self.source)
        self.default_prompt = self.render_prompt(DEFAULT_QUESTION)

    # --- forward -----------------------------------------------------------------------------------------

    @property
    def regressor(self) -> torch.nn.Module | None:
        """Q-Scorer's MLP, a submodule of the model (so the optimizer, DDP and peft see it)."""
        return getattr(self.model, REGRESSOR_ATTR, None)

    @property
    def has_regressor(self) -> bool:
        return self.regressor is not None

    def _splice(
        self, visual: VisualInputs, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, left: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Model inputs with each row's image ids in place of the image token, right-padded (`left`: left-padded,
        so every row ends at the last position, as generation needs); and where each input id landed [B, T] (the
        replaced ones: where the image's ids start) and each row's last real position [B].

        A row whose ids carry their own vision markers (`OWN_MARKERS`, Qwen3-VL's video) replaces the vision start
        and end tokens right around the slot too, where the prompt has them: Qwen3VLProcessor collapses the chat
        template's `<|vision_start|><|video_pad|><|vision_end|>` to the bare video token before expanding it."""
        device = self.device
        b, t = input_ids.shape
        image_ids = visual[IMAGE_IDS].to(device)
        lengths = (image_ids >= 0).sum(1)  # B
        mask_in = attention_mask.to(device).bool() if attention_mask is not None else torch.ones_like(input_ids).bool()
        is_slot = input_ids == self.image_token_id
        if not bool((is_slot.sum(1) == 1).all()):
            raise UserError(f"the prompt must hold the image token {self.image_token!r} exactly once")
        slot = is_slot.long().argmax(1)  # B
        idx = torch.arange(t, device=device)[None]
        wrap = self._wrapped_slots(visual, input_ids, mask_in, slot).long()  # B: 1 where the markers go too
        first, last = slot - wrap, slot + wrap  # B: the span of input ids the image's ids replace
        width = 1 + 2 * wrap
        text_pos = torch.where(idx < first[:, None], idx, first[:, None])  # B, T
        text_pos = torch.where(idx > last[:, None], idx + (lengths - width)[:, None], text_pos)
        sizes = t - width + lengths  # B: each row's spliced length
        total = int(sizes.max())
        shift = (total - sizes) if left else torch.zeros_like(lengths)  # B: each row's left padding
        text_pos = text_pos + shift[:, None]
        slot = first + shift
        ids = torch.full((b, total), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(b, total, dtype=torch.long, device=device)
        kept = (idx < first[:, None]) | (idx > last[:, None])
        rows = torch.arange(b, device=device)[:, None].expand(b, t)
        ids[rows[kept], text_pos[kept]] = input_ids[kept]
        mask[rows[kept], text_pos[kept]] = mask_in[kept].long()
        n = image_ids.shape[1]
        image_pos = slot[:, None] + torch.arange(n, device=device)[None]  # B, N
        real = image_ids >= 0
        brows = torch.arange(b, device=device)[:, None].expand(b, n)
        ids[brows[real], image_pos[real]] = image_ids[real]
        mask[brows[real], image_pos[real]] = 1
        inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
        if TOKEN_TYPES in visual:
            types = torch.zeros(b, total, dtype=visual[TOKEN_TYPES].dtype, device=device)
            types[brows[real], image_pos[real]] = visual[TOKEN_TYPES].to(device)[real]
            inputs[TOKEN_TYPES] = types
        for name, value in visual.items():
            if name in (IMAGE_IDS, HAS_IMAGE, TOKEN_TYPES, OWN_MARKERS):
                continue
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(self.dtype)
            inputs[name] = value
        if self.flat:  # the patches of each image (and video), concatenated in row order; rows without one left out
            for pixels, grid in ((FLAT_PIXELS, GRID), (VIDEO_PIXELS, VIDEO_GRID)):
                if grid not in inputs:
                    continue
                counts = inputs[grid].prod(-1)
                rows = counts > 0
                inputs[pixels] = torch.cat([inputs[pixels][i, : int(c)] for i, c in enumerate(counts) if c > 0])
                inputs[grid] = inputs[grid][rows]
                if grid == VIDEO_GRID and VIDEO_TIMES in inputs:
                    inputs[VIDEO_TIMES] = inputs[VIDEO_TIMES][rows]
        last_input = (mask_in.long() * idx).argmax(1)  # each row's last real input id
        last_index = text_pos.gather(1, last_input[:, None])[:, 0]
        return inputs, text_pos, last_index

    def _wrapped_slots(
        self, visual: VisualInputs, input_ids: torch.Tensor, mask_in: torch.Tensor, slot: torch.Tensor
    ) -> torch.Tensor:
        """B booleans: the row's ids carry their own vision markers and the prompt has the start token right
        before the slot and the end token right after it (a prompt without that exact pair keeps what it has,
        as the processor expands a bare video token)."""
        b, t = input_ids.shape
        if OWN_MARKERS not in visual or self.slot_markers is None:
            return torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        own = visual[OWN_MARKERS].to(input_ids.device).bool()
        rows = torch.arange(b, device=input_ids.device)
        before, after = (slot - 1).clamp(min=0), (slot + 1).clamp(max=t - 1)
        start, end = self.slot_markers
        return (
            own
            & (slot > 0)
            & (slot < t - 1)
            & (input_ids[rows, before] == start)
            & (input_ids[rows, after] == end)
            & mask_in[rows, before]
            & mask_in[rows, after]
        )

    def _sharded(self) -> bool:
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.model, FSDPModule)

    def _text_only(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The prompt without its image slot: a forward through every layer that needs no image."""
        kept = input_ids != self.image_token_id
        if attention_mask is not None:
            kept &= attention_mask.to(self.device).bool()
        ids = input_ids[kept][None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def _hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final-norm hidden states [B, L, C] of the model's decoder (peft's LoRA layers sit inside it). An
        FSDP2-sharded model (evaluation inside `iqa train`) runs through its root, whose hooks gather the
        parameters; otherwise the decoder alone runs, without the other layers' hidden states."""
        if self._sharded():
            out = self.model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
            return out.hidden_states[-1]
        return self.model.model(**inputs, use_cache=False).last_hidden_state

    def forward(
        self,
        visual: VisualInputs,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        logits_at: str | torch.Tensor = "last",
        use_cache: bool = False,
    ) -> BackboneOutput:
        """Logits only where asked: "last" runs the LM head at each row's last real position alone.

        Rows are right-padded to the longest expansion, so `hidden_states` is the padded sequence [B, L, C] with
        each row's last real position appended once more at the end: `hidden_states[:, -1]` is the state that
        predicts the level, as it is for families without padding. Rows without an image (`has_image` 0) are
        never computed and come back as zeros."""
        if use_cache:
            raise UserError(
                f"{self.name}: the appended-token regressor readout is for released mPLUG-Owl2 Q-Scorer"
                " checkpoints only"
            )
        b = input_ids.shape[0]
        input_ids = input_ids.to(self.device)
        has = visual[HAS_IMAGE].bool().to(self.device) if HAS_IMAGE in visual else torch.ones(b, dtype=torch.bool)
        rows = has.nonzero()[:, 0]
        if len(rows) == 0:  # a batch of failed images only
            if self._sharded():  # FSDP2 all-gathers inside every forward: the other ranks wait for this one's
                self._hidden(self._text_only(input_ids[:1], attention_mask))
            zeros = torch.zeros(b, 1, dtype=torch.long, device=self.device)
            logits = torch.zeros(b, 1, self.vocab_size, dtype=self.dtype, device=self.device)
            hidden = torch.zeros(b, 1, self.model.config.get_text_config().hidden_size, dtype=self.dtype,
                                 device=self.device)  # fmt: skip
            return BackboneOutput(logits if logits_at != "none" else None, hidden, zeros, zeros[:, 0])
        if len(rows) < b:  # padding rows: the model runs on the real rows only, the others stay zero
            sub = {name: value.to(self.device)[rows] for name, value in visual.items()}
            mask = attention_mask.to(self.device)[rows] if attention_mask is not None else None
            part = self.forward(sub, input_ids[rows], attention_mask=mask, logits_at=logits_at)
            return _scatter_rows(part, rows, b)
        inputs, text_pos, last_index = self._splice(visual, input_ids, attention_mask)
        hidden = self._hidden(inputs)
        head = self.model.get_output_embeddings()
        if isinstance(logits_at, torch.Tensor):
            logits = head(hidden.gather(1, logits_at[..., None].expand(-1, -1, hidden.shape[-1])))
        elif logits_at == "last":
            logits = head(hidden[torch.arange(b, device=hidden.device), last_index][:, None])
        elif logits_at == "all":
            logits = head(hidden)
        else:
            logits = None
        # hidden_states[:, -1] is what the regressor reads: each row's last real position goes last
        last = hidden[torch.arange(b, device=hidden.device), last_index][:, None]
        return BackboneOutput(logits, torch.cat([hidden, last], 1) if hidden.shape[1] else last, text_pos, last_index)

    __call__ = forward

    def decode_step(self, input_ids: torch.Tensor, past_key_values: Any) -> BackboneOutput:
        raise UserError(f"{self.name}: cached decoding is not used by this family's readouts")

    def regress(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.regressor is None:
            raise UserError(f"{self.source}: no regression head")
        return self.regressor(hidden.float())

    def tensor_inputs(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """`TensorInputs` (Scorer.score_tensors): Qwen-VL's and LLaVA-OneVision's preprocessing in torch;
        Idefics3's image splitting has none here."""
        if self.name == "llava_onevision":
            return anyres_tensor_inputs(image, self.processor, self.image_token_id)
        if not self.flat:
            raise UserError(
                f"{self.name}: score_tensors supports {', '.join((*PATCH_GRID_FAMILIES, 'llava_onevision'))} only;"
                f" {self.name}'s image splitting has no torch preprocessing"
            )
        token_types = TOKEN_TYPES in self.processor.model_input_names
        return patch_grid_tensor_inputs(image, self.preprocessor, self.images_kwargs, self.image_token_id, token_types)

    def tensor_collate(self, rows: list[dict[str, torch.Tensor]], batch_size: int) -> dict[str, torch.Tensor]:
        """`tensor_inputs` rows of different sizes -> one padded batch of `batch_size` rows (autograd kept)."""
        return tensor_collate(rows, batch_size)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])


def _scatter_rows(part: BackboneOutput, rows: torch.Tensor, b: int) -> BackboneOutput:
    def spread(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        full = x.new_zeros((b, *x.shape[1:]))
        full[rows] = x
        return full

    return BackboneOutput(
        spread(part.logits), spread(part.hidden_states), spread(part.text_positions), spread(part.last_index)
    )


# --- loading -----------------------------------------------------------------------------------------------


def load(
    model: str | Path,
    *,
    base: str | Path | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> HFVisionLanguageBackbone:
    """The registry's entry point: a Hub repo id or directory holding a transformers checkpoint and processor
    (an `iqa train` run directory is one, with its `iqa.json`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _check_config(model, revision)
    source = str(model)
    # decided before transformers is asked (which would retry a dead network for half a minute): a local folder
    # (a cached snapshot too, when the Hub cannot be reached), or a repo id that the Hub knows
    where = hub.locate(model, revision)
    weights_dir = where if isinstance(where, Path) else None
    cached_repo, cached_commit = hub.provenance_from_cache_path(weights_dir.resolve()) if weights_dir else (None, None)
    revision = None if weights_dir else revision
    adapter = weights_dir is not None and (weights_dir / ADAPTER_CONFIG).is_file()
    if adapter:
        base = str(hub.locate(base or _adapter_base(weights_dir), what="base model"))
    elif base is not None:
        raise UserError(f"base model {base}: a base applies to LoRA adapters only, and {source} is a full model")
    try:
        with _quiet_transformers():
            processor = AutoProcessor.from_pretrained(str(where), revision=revision, trust_remote_code=False)
            _check_processor(processor, source)  # before any weights are read
            loaded = AutoModelForImageTextToText.from_pretrained(
                str(base if adapter else where),
                revision=None if adapter else revision,
                dtype=dtype or torch.float32,
                trust_remote_code=False,
                # straight onto a GPU (no float32 host copy first: under torchrun one per rank)
                **({"device_map": str(device)} if device is not None and torch.device(device).type == "cuda" else {}),
            )
            if adapter:
                loaded = _merge_adapter(loaded, processor, weights_dir)
    except OSError as exc:
        raise UserError(f"{source}: cannot load the model or processor ({' '.join(str(exc).split())[:300]})") from None
    loaded = loaded.to(device or "cpu").eval()
    model_type = loaded.config.model_type
    patch = int(getattr(processor.image_processor, "patch_size", 14) or 14)
    merge = int(getattr(processor.image_processor, "merge_size", 1) or 1)
    if min_pixels is None and max_pixels is None and weights_dir is not None:  # a run: scored as it was trained
        min_pixels, max_pixels = _trained_pixels(weights_dir)
    kwargs = pixel_options(model_type, min_pixels, max_pixels, patch * merge)
    commit = getattr(loaded.config, "_commit_hash", None) or cached_commit or ""
    provenance = Provenance(
        model=cached_repo or (str(weights_dir.resolve()) if weights_dir else source),
        revision=commit or "",
        layout="lora" if adapter else "full",
        weights_dir=weights_dir,
        base_model=str(base) if adapter else "",
    )
    backbone = HFVisionLanguageBackbone(loaded, processor, provenance=provenance, images_kwargs=kwargs, source=source)
    if weights_dir is not None and (weights_dir / REGRESSOR_FILE).is_file():
        backbone.load_regressor(weights_dir)
    return backbone


FAMILIES = {
    model_type: Family(name=model_type, image_token=token, load=load, output_files=OUTPUT_FILES)
    for model_type, token in IMAGE_TOKENS.items()
}
FAMILY = FAMILIES["qwen2_5_vl"]
