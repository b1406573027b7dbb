"""mPLUG-Owl2 as a `Backbone`: the registry's `load`, the CLIP transform and collate, the -200 image slot.

Everything scoring needs from this family goes through `MPLUGOwl2Backbone`; the released checkpoints' own
conventions (Q-Scorer's appended-token readout, the evaluation prompt) are decided here, not in scoring.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from iqa_cli.batch_buffer import batch_buffer
from iqa_cli.constants import IGNORE_INDEX, RESPONSE_PREFIX
from iqa_cli.errors import UserError
from iqa_cli.models.backbone import (
    ADAPTER_CONFIG,
    CONFIG_FILE,
    BackboneOutput,
    Family,
    ModuleBackbone,
    Provenance,
    VisualInputs,
)
from iqa_cli.models.mplug_owl2 import LORA_TARGETS
from iqa_cli.models.mplug_owl2.tokenizer import (
    DEFAULT_PROMPT,
    EVAL_TEMPLATE,
    IMAGE_TOKEN,
    QUICKSTART_PROMPT,
    TRAIN_TEMPLATE,
    build_training_ids,
    level_token_ids,
    tokenize_prompt,
)

if TYPE_CHECKING:
    from iqa_cli.models.mplug_owl2.checkpoints import LoadedCheckpoint
    from iqa_cli.models.mplug_owl2.model import MPLUGOwl2ForCausalLM

PIXELS = "pixel_values"  # the visual input: CLIP-normalized squares [3, S, S] per image, [F, 3, S, S] per video
FRAME_COUNTS = "frame_counts"  # videos: [B] real frames of each row (the rest padding frames, masked out)
SAVE_SHARD_BYTES = 5 * 1024**3  # weights files of a trained model, as the released checkpoints are cut
PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NON_LORA = "non_lora_trainables.bin"  # the reference's trained non-LoRA tensors of a LoRA run
# Files besides the weights that make a directory loadable: copied next to a LoRA run's merged weights.
PROCESSING_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
)


@dataclass(frozen=True)
class ClipTransform:
    """RGB PIL image -> {"pixel_values": ...}; picklable for DataLoader workers.

    With a `ClipPreprocessor` the item is the uint8 square [S, S, 3] before the value table, which
    `SquareCollate` applies straight into the batch: no float copy per image. Any other image -> [3, S, S]
    callable gives its float tensor as it is.
    """

    preprocessor: Any  # ClipPreprocessor, or any image -> [3, S, S] callable
    fast: bool = False  # `--fast-decode`: the ClipPreprocessor's fast resize (not the reference's pixels)

    def __call__(self, image: Any) -> dict[str, torch.Tensor]:
        uint8_pixels = getattr(self.preprocessor, "uint8_pixels", None)
        if uint8_pixels is not None:
            return {PIXELS: torch.from_numpy(uint8_pixels(image, fast=self.fast))}
        return {PIXELS: self.preprocessor(image)}

    def fast_variant(self) -> ClipTransform:
        """This transform for `--fast-decode`."""
        return dataclasses.replace(self, fast=True)


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class SquareCollate:
    """Stacks per-image pixels into one [batch_size, 3, S, S] buffer (shared memory in a worker); rows without
    an image are zeros. Pixels are cast to `dtype` here, in the worker: the same rounding the model's own cast
    would do, and half the bytes to pin and copy for 16-bit models.

    uint8 items [S, S, 3] (from `ClipTransform`) go through `preprocessor`'s value table cast to `dtype`, looked
    up into the batch's rows: the float values, then the cast, of `ClipPreprocessor.pixels`, bit for bit."""

    image_size: int
    preprocessor: Any = None  # the ClipPreprocessor whose value table normalizes uint8 items

    def __call__(
        self, items: list[VisualInputs | None], batch_size: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        s = self.image_size
        pixels = batch_buffer((batch_size, 3, s, s), dtype)
        filled = torch.zeros(batch_size, dtype=torch.bool)
        table = rows = None
        for row, item in enumerate(items):
            if item is None:
                continue
            values = item[PIXELS]
            if values.dtype == torch.uint8:
                if table is None:
                    table, rows = self._table_and_rows(pixels, dtype)
                for c in range(3):
                    np.take(table[c], values[..., c].numpy(), out=rows[row, c])
            else:
                pixels[row] = values
            filled[row] = True
        pixels[~filled] = 0
        return {PIXELS: pixels}

    def _table_and_rows(self, pixels: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
        """The value table in `dtype` and the batch, both as numpy integers of the same width (numpy has no
        bfloat16; a lookup copies bit patterns, so this is exact for every dtype)."""
        if self.preprocessor is None:
            raise ValueError("uint8 pixels need the ClipPreprocessor whose value table normalizes them")
        as_int = _SAME_WIDTH_INT[dtype.itemsize]
        table = torch.from_numpy(self.preprocessor.value_table()).to(dtype)
        return table.view(as_int).numpy(), pixels.view(as_int).numpy()


@dataclass(frozen=True)
class FramesTransform:
    """A video's sampled frames (an `iqa_cli.video.Video`, or a list of RGB PIL images) -> {"pixel_values":
    [F, S, S, 3] uint8} (or [F, 3, S, S] floats):
    each frame as `ClipTransform` makes an image, padded to a square with the CLIP mean first, as Q-Align's
    `QAlignVideoScorer` pads every frame (`expand2square`). Picklable."""

    image: ClipTransform

    def __call__(self, video: Any) -> dict[str, torch.Tensor]:
        frames = list(getattr(video, "frames", video))
        if not frames:
            raise ValueError("a video needs at least one frame")
        return {PIXELS: torch.stack([self.image(frame)[PIXELS] for frame in frames])}


@dataclass(frozen=True)
class FramesCollate:
    """Videos' frames (and images, as videos of one frame) -> pixels [batch_size, F, 3, S, S] and `frame_counts`,
    F the most frames of any item; a row's missing frames and rows without an item are zeros. Built as one
    `SquareCollate` batch of batch_size x F squares (the same value table, in shared memory in a worker)."""

    squares: SquareCollate

    def __call__(
        self, items: list[VisualInputs | None], batch_size: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        frames = [_frames_of(item) for item in items]
        f = max((len(v) for v in frames if v is not None), default=1)
        flat: list[VisualInputs | None] = []
        counts = torch.zeros(batch_size, dtype=torch.int64)
        for row, values in enumerate(frames):
            if values is not None:
                flat += [{PIXELS: v} for v in values] + [None] * (f - len(values))
                counts[row] = len(values)
            else:
                flat += [None] * f
        s = self.squares.image_size
        pixels = self.squares(flat, batch_size * f, dtype)[PIXELS].view(batch_size, f, 3, s, s)
        return {PIXELS: pixels, FRAME_COUNTS: counts}


def _frames_of(item: VisualInputs | None) -> list[torch.Tensor] | None:
    """An item's frames: [F, S, S, 3] uint8 or [F, 3, S, S] float is F frames; one image is one."""
    if item is None:
        return None
    values = item[PIXELS]  # one image: [S, S, 3] uint8 or [3, S, S] float; F frames: one more dimension first
    return [values] if values.dim() == 3 else list(values.unbind(0))


class MPLUGOwl2Backbone(ModuleBackbone):
    """The mPLUG-Owl2 port as a `Backbone`."""

    name = "mplug_owl2"
    image_token = IMAGE_TOKEN
    default_prompt = DEFAULT_PROMPT  # the scoring prompt of a trained model: DEFAULT_QUESTION in the eval layout
    lora_targets = LORA_TARGETS

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
        self.collate = SquareCollate(side, preprocessor)
        self.video_transform = FramesTransform(self.transform)
        self.video_collate = FramesCollate(self.collate)

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
    def has_regressor(self) -> bool:
        return self.model.deepmlp is not None

    def default_scoring(self) -> tuple[str, list[int], str | None]:
        if self.score_token_ids:  # the released Q-Scorer layout: scored as its authors do (docs/METHOD.md, "Q-Scorer")
            return QUICKSTART_PROMPT, list(self.score_token_ids), "appended" if self.has_regressor else None
        return DEFAULT_PROMPT, [], "last" if self.has_regressor else None

    def encode_prompt(self, prompt: str) -> list[int]:
        return tokenize_prompt(self.tokenizer, prompt)

    def task_prompt(self, task: str, *, video: bool = False) -> str:
        """The evaluation template with the task's question and answer (`iqa_cli.tasks`): for quality of an
        image the papers' prompt; for a video Q-Align's video evaluation (`vqa_eval.py`) prompt."""
        from iqa_cli.tasks import question, response_prefix

        return EVAL_TEMPLATE.prompt(question(task, video), response_prefix(task, video))

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
        out = self.model(
            input_ids,
            pixels,
            attention_mask=attention_mask,
            logits_at=logits_at,
            use_cache=use_cache,
            frame_counts=visual.get(FRAME_COUNTS),
        )
        return BackboneOutput(out.logits, out.hidden_states, out.text_positions, out.last_index, out.past_key_values)

    __call__ = forward

    def decode_step(self, input_ids: torch.Tensor, past_key_values: Any) -> BackboneOutput:
        out = self.model(input_ids, past_key_values=past_key_values, logits_at="last")
        return BackboneOutput(out.logits, out.hidden_states, out.text_positions, out.last_index, out.past_key_values)

    def regress(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.deepmlp(hidden)

    def tensor_inputs(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        tensor_pixels = getattr(self.preprocessor, "tensor_pixels", None)
        if tensor_pixels is None:
            raise UserError(f"{type(self.preprocessor).__name__} has no torch preprocessing (score_tensors)")
        return {PIXELS: tensor_pixels(image)}

    # --- training ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.model.config.language.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def level_token_ids(self, words: list[str] | tuple[str, ...]) -> list[int]:
        """The id each level word is read at (its first token alone); two words sharing one is a UserError."""
        return level_token_ids(self.tokenizer, words)

    def add_tokens(self, tokens: list[str] | tuple[str, ...]) -> list[int]:
        """Adds special tokens; new embedding rows start as the mean of the others (the reference's resize)."""
        ids = self.tokenizer.add_tokens(tokens, special=True)
        if len(self.tokenizer) > self.vocab_size:
            self.model.resize_token_embeddings(len(self.tokenizer))
        return ids

    def record_score_tokens(self, ids: list[int] | tuple[int, ...]) -> None:
        """Q-Scorer's score token ids in config.json (the reference stores <scoreK> first)."""
        self.model.config.score_token_id = list(reversed(ids))

    def encode_training(
        self,
        question: str,
        level_token: str,
        level_token_id: int,
        *,
        image_first: bool,
        response_prefix: str = RESPONSE_PREFIX,
    ) -> tuple[list[int], list[int], int]:
        """(input ids, labels, level position) of one conversation, masked as the reference masks it; the answer
        is `response_prefix` and the level (`{prefix} {level}.`).

        The level token is the last occurrence of its id among the supervised labels (the response ends with
        `{level}.</s>`). A level word whose first piece differs in context from its piece alone (what scoring
        reads) is a UserError: training would teach a token that scoring never looks at.
        """
        template = TRAIN_TEMPLATE if image_first else EVAL_TEMPLATE
        ids, labels = build_training_ids(self.tokenizer, question, f"{response_prefix} {level_token}.", template)
        hits = [t for t, label in enumerate(labels) if label == level_token_id]
        if not hits or all(label == IGNORE_INDEX for label in labels):
            pieces = [self.tokenizer.id_to_token(i) if i >= 0 else IMAGE_TOKEN for i in ids]
            raise UserError(
                f"level {level_token!r}: its token (id {level_token_id}) is not among the supervised response tokens "
                f"of {pieces}; choose level names that tokenize the same inside a sentence"
            )
        return ids, labels, hits[-1]

    def add_regressor(self, dims: list[int]) -> None:
        """Q-Scorer's MLP, Kaiming-normal (fan_in, ReLU) weights and zero biases as the reference initializes
        it; a checkpoint that has one keeps it."""
        from torch import nn

        from iqa_cli.models.mplug_owl2.regressor import ScoreRegressor

        core = self.model
        if core.deepmlp is not None:
            return
        weight = core.lm_head.weight
        mlp = ScoreRegressor(core.config.language.hidden_size, dims).to(device=weight.device, dtype=torch.float32)
        for module in mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        core.deepmlp = mlp
        core.config.deepmlp_hidden_dims = dims

    def lora_target_modules(self, suffixes: list[str] | tuple[str, ...]) -> list[str]:
        """Full names of the LLM Linear layers whose names end with a suffix (never in the vision model or
        the abstractor)."""
        from torch import nn

        return [
            name
            for name, module in self.model.named_modules()
            if isinstance(module, nn.Linear)
            and name.startswith("model.layers.")
            and any(name == s or name.endswith("." + s) for s in suffixes)
        ]

    def trainable_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Parameters by part: "vision" (ViT), "projector" (abstractor), "output" (lm_head), "regressor"."""
        core = self.model
        return {
            "output": [core.lm_head.weight],
            "regressor": list(core.deepmlp.parameters()) if core.deepmlp is not None else [],
            "vision": list(core.model.vision_model.parameters()),
            "projector": list(core.model.visual_abstractor.parameters()),
        }

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.model.set_gradient_checkpointing(enabled)

    def fsdp_units(self) -> list[torch.nn.Module]:
        """FSDP2 units: each ViT, abstractor and decoder layer, and the Q-Scorer MLP (the model is the root)."""
        core = self.model
        units = [*core.model.vision_model.encoder.layers, *core.model.visual_abstractor.encoder.layers]
        units += [*core.model.layers]
        if core.deepmlp is not None:
            units.append(core.deepmlp)
        return units

    def training_forward(
        self,
        module: torch.nn.Module,
        visual: VisualInputs,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hidden_at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [N, T, V] at the input ids' own positions, and final-norm hidden states [N, C] at the input-id
        positions `hidden_at` [N]. `module` is this backbone's model or a wrapper of it (peft).

        Logits are computed only where text tokens landed in the expanded sequence (the 65 visual positions
        carry no labels), so `logits[:, t]` belongs to input token t.
        """
        from iqa_cli.models.mplug_owl2.model import IMAGE_TOKEN_INDEX, expanded_positions, gather_rows

        t = input_ids.shape[1]
        slot = (input_ids == IMAGE_TOKEN_INDEX).long().argmax(1)
        text_pos = expanded_positions(slot, t, self.model.visual_length(visual[PIXELS]))  # N, T
        frames = visual.get(FRAME_COUNTS)
        extra = {"frame_counts": frames} if frames is not None else {}
        out = module(input_ids, visual[PIXELS], attention_mask=attention_mask, logits_at=text_pos, **extra)
        hidden = None
        if hidden_at is not None:
            hidden = gather_rows(out.hidden_states, text_pos.gather(1, hidden_at[:, None]))[:, 0]  # N, C
        return out.logits, hidden

    def save(
        self,
        out: str | Path,
        *,
        state: dict | None = None,
        dtype: torch.dtype | None = None,
        processing: bool = True,
    ) -> None:
        """config.json + safetensors under the released key names, then (with `processing`) the tokenizer and
        preprocessing files; `state` is a gathered full state dict (FSDP) to write instead of the model's own."""
        import copy

        from iqa_cli.models.mplug_owl2.checkpoints import save_mplug_owl2
        from iqa_cli.models.mplug_owl2.model import build_skeleton

        model = self.model
        if state is not None:
            model = build_skeleton(copy.deepcopy(self.model.config))
            model.load_state_dict(state, assign=True)
        if dtype is not None:
            model = model.to(dtype)
        save_mplug_owl2(model, out, max_shard_bytes=SAVE_SHARD_BYTES)
        if processing:
            self.save_processing(out)

    def save_processing(self, out: str | Path) -> None:
        self.tokenizer.save(Path(out))
        self.preprocessor.save(Path(out))

    def save_adapter(self, peft_model: torch.nn.Module, out: str | Path, base: str | None) -> None:
        """The released peft layout: adapter_config.json, adapter weights (keys
        `base_model.model.<module>.lora_A.weight`), non_lora_trainables.bin (every trained non-LoRA tensor, keys
        prefixed `base_model.model.`; for Q-Scorer also the resized embed_tokens and lm_head, as Q-Scorer's
        fixed reference saves them), the run's config.json, the tokenizer and preprocessing files."""
        import copy

        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        adapter = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
        save_file(adapter, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        lora_config = copy.deepcopy(peft_model.peft_config["default"])
        lora_config.base_model_name_or_path = base
        lora_config.inference_mode = True
        lora_config.task_type = "CAUSAL_LM"  # as the released adapters record it
        lora_config.target_modules = sorted(lora_config.target_modules, key=_module_order)
        lora_config.save_pretrained(str(out))
        resized = ("model.embed_tokens.weight", "lm_head.weight") if self.model.deepmlp is not None else ()
        non_lora = {
            name: p.detach().cpu().clone()
            for name, p in peft_model.named_parameters()
            if "lora_" not in name and (p.requires_grad or name.removeprefix(PEFT_PREFIX) in resized)
        }
        torch.save(non_lora, out / NON_LORA)
        self.model.config.save(out)
        self.save_processing(out)

    processing_files = PROCESSING_FILES


def _module_order(name: str) -> tuple:
    """model.layers.2.x before model.layers.10.x."""
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


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


OUTPUT_FILES = (
    CONFIG_FILE,
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    NON_LORA,
    *PROCESSING_FILES,
)
FAMILY = Family(name=MPLUGOwl2Backbone.name, image_token=IMAGE_TOKEN, load=load, wrap=wrap, output_files=OUTPUT_FILES)
