"""A transformers vision-language model as a `Backbone`: the registry's `load`, the processor-based transform and
collate, the chat-template prompt and the level-token check.

The image slot: the prompt holds the processor's image token once; the transform runs the family's own processor
on that token alone with the image, which gives the image's pixel tensors and the ids the token expands to (e.g.
256 `<|image_pad|>` for a 448x448 Qwen2-VL input, or Idefics3's crop grid with its row/column tokens). `forward`
splices those ids into the prompt, so the model sees exactly what `processor(text=prompt, images=[image])` gives.
Rows of a batch with different expansions are right-padded: causal attention keeps a row's real tokens from ever
seeing the padding after them and their positions do not move, so a score does not depend on its batch-mates.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from iqa_cli.batch_buffer import batch_buffer
from iqa_cli.constants import DEFAULT_QUESTION, IGNORE_INDEX, RESPONSE_PREFIX, RESPONSE_TEMPLATE, RUN_FILE
from iqa_cli.errors import UserError
from iqa_cli.models.backbone import BackboneOutput, Family, Provenance, VisualInputs
from iqa_cli.models.hf_vlm import (
    DEFAULT_PIXELS,
    DEFAULT_TRAIN_MODEL,
    IMAGE_TOKENS,
    LORA_TARGETS,
    PATCH_GRID_FAMILIES,
)

IMAGE_IDS = "image_ids"  # B, N: the ids the image token expands to, right-padded with -1
HAS_IMAGE = "has_image"  # B: 1 for a row holding an image (padding rows are 0)
TOKEN_TYPES = "mm_token_type_ids"  # Qwen-VL: 0 text, 1 image, per position (M-RoPE needs it)
TEXT_KEYS = ("input_ids", "attention_mask", TOKEN_TYPES, "token_type_ids")  # processor outputs over the text
FLAT_PIXELS = "pixel_values"  # Qwen-VL: [patches, D] per image, concatenated over images in the model call
GRID = "image_grid_thw"
REGRESSOR_FILE = "regressor.safetensors"  # Q-Scorer's MLP next to a trained model's weights
REGRESSOR_ATTR = "iqa_regressor"  # its attribute on the model
NON_LORA = "non_lora_trainables.safetensors"  # a LoRA run's trained tensors outside the adapter (vision, lm_head)
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ProcessorTransform:
    """RGB PIL image -> the family processor's pixel tensors for it and the ids of its expanded image token;
    picklable for DataLoader workers."""

    processor: Any
    image_token: str
    flat: bool  # Qwen-VL: pixel_values without an image dimension
    images_kwargs: dict = field(default_factory=dict)  # Qwen-VL: {"size": {"shortest_edge": min, "longest_edge": max}}

    def __call__(self, image: Any) -> dict[str, torch.Tensor]:
        out = self.processor(
            text=[self.image_token],
            images=[image],
            add_special_tokens=False,
            return_tensors="pt",
            **self.images_kwargs,
        )
        item = {IMAGE_IDS: out["input_ids"][0]}
        if TOKEN_TYPES in out:
            item[TOKEN_TYPES] = torch.as_tensor(out[TOKEN_TYPES][0])
        for name, value in out.items():
            if name in TEXT_KEYS or not isinstance(value, torch.Tensor):
                continue
            item[name] = value if (self.flat and name == FLAT_PIXELS) else value[0]
        return item


@dataclass(frozen=True)
class PaddedCollate:
    """Per-image tensors -> batch-first tensors zero-padded to the largest in every dimension (image ids padded
    with -1), plus `has_image`; every key keeps its rows first, as the scoring pipeline slices batches by row."""

    def __call__(
        self, items: list[VisualInputs | None], batch_size: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        present = [item for item in items if item is not None]
        if not present:  # a batch of failed images only: one empty row shape the forward never reaches
            return {
                IMAGE_IDS: torch.full((batch_size, 1), -1, dtype=torch.long),
                HAS_IMAGE: torch.zeros(batch_size, dtype=torch.int8),
            }
        out: dict[str, torch.Tensor] = {}
        for name, first in present[0].items():
            shape = [max(item[name].shape[d] for item in present) for d in range(first.dim())]
            cast = dtype if first.is_floating_point() else first.dtype
            batch = batch_buffer((batch_size, *shape), cast)
            batch.fill_(-1 if name == IMAGE_IDS else 0)
            for row, item in enumerate(items):
                if item is not None:
                    value = item[name]
                    batch[(row, *(slice(0, s) for s in value.shape))] = value
            out[name] = batch
        out[HAS_IMAGE] = torch.tensor(
            [item is not None for item in items] + [False] * (batch_size - len(items)), dtype=torch.int8
        )
        return out


class HFVisionLanguageBackbone:
    """A transformers `*ForConditionalGeneration` vision-language model and its processor as a `Backbone`."""

    lora_targets = LORA_TARGETS
    default_train_model = DEFAULT_TRAIN_MODEL

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
        self.score_token_ids: list[int] = list(getattr(model.config, "score_token_ids", None) or [])
        _check_processor(processor, self.source)
        self.default_prompt = self.render_prompt(DEFAULT_QUESTION)

    # --- prompt and levels -------------------------------------------------------------------------------

    def render_prompt(self, question: str, response: str = RESPONSE_PREFIX) -> str:
        """The family's chat template over [image, question] and the assistant's answer continued from
        `response` (no end-of-turn after it): the level is the next token."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": response}]},
        ]
        text = self.processor.apply_chat_template(messages, continue_final_message=True, tokenize=False)
        if text.count(self.image_token) != 1:
            raise UserError(
                f"{self.source}: the chat template renders {text.count(self.image_token)} image tokens"
                f" {self.image_token!r} for one image: {text!r}"
            )
        return text

    def encode_prompt(self, prompt: str) -> list[int]:
        """Ids of the rendered text as the processor tokenizes it (a template that starts with the BOS token
        gets no second one)."""
        bos = self.tokenizer.bos_token
        add_special = not (bos is not None and prompt.startswith(bos))
        return list(self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"])

    def default_scoring(self) -> tuple[str, list[int], str | None]:
        return self.default_prompt, [], "last" if self.has_regressor else None

    def level_tokens(self, word: str, prompt: str | None = None) -> list[str]:
        """The tokens `word` becomes where it stands after the prompt (after a space, as in the response)."""
        prompt = self.default_prompt if prompt is None else prompt
        before = self.encode_prompt(prompt)
        after = self.encode_prompt(f"{prompt} {word}")
        if after[: len(before)] != before:  # the word merged with the prompt's last token
            return self.tokenizer.convert_ids_to_tokens(after[len(before) - 1 :])
        return self.tokenizer.convert_ids_to_tokens(after[len(before) :])

    def level_token_id(self, word: str) -> int:
        """An added token by name (Q-Scorer's <scoreK>), else the one token of " word" after the prompt; a word
        that is not one token there is a one-line UserError naming its tokens and one-token alternatives."""
        added = self.tokenizer.get_added_vocab()
        if word in added:
            return added[word]
        tokens = self.level_tokens(word)
        if len(tokens) != 1:
            raise UserError(
                f"level word {word!r} is {len(tokens)} tokens {tokens} after the prompt of {self.source}, not one;"
                f" {self._alternatives(word)}"
            )
        return int(self.tokenizer.convert_tokens_to_ids(tokens[0]))

    def _alternatives(self, word: str) -> str:
        variants = dict.fromkeys([word.lower(), word.capitalize(), word.upper()])
        single = [v for v in variants if len(self.level_tokens(v)) == 1 and v != word]
        if single:
            return f"one-token alternatives: {', '.join(single)}"
        return "no case variant is one token; choose another word (or Q-Scorer's --method qscorer score tokens)"

    def level_token_ids(self, words: list[str] | tuple[str, ...]) -> list[int]:
        ids = [self.level_token_id(w) for w in words]
        if len(set(ids)) != len(ids):
            raise UserError(f"level words {list(words)} do not map to distinct tokens: {ids}")
        return ids

    # --- forward -----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def regressor(self) -> torch.nn.Module | None:
        """Q-Scorer's MLP, a submodule of the model (so the optimizer, DDP and peft see it)."""
        return getattr(self.model, REGRESSOR_ATTR, None)

    @property
    def has_regressor(self) -> bool:
        return self.regressor is not None

    def _splice(
        self, visual: VisualInputs, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Model inputs with each row's image ids in place of the image token, right-padded; and where each
        input id landed [B, T] and each row's last real position [B]."""
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
        text_pos = torch.where(idx > slot[:, None], idx + lengths[:, None] - 1, idx)  # B, T
        total = int((t - 1 + lengths).max())
        ids = torch.full((b, total), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(b, total, dtype=torch.long, device=device)
        kept = ~is_slot
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
            if name in (IMAGE_IDS, HAS_IMAGE, TOKEN_TYPES):
                continue
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(self.dtype)
            inputs[name] = value
        if self.flat:  # the patches of each image, concatenated in row order
            counts = inputs[GRID].prod(-1)
            inputs[FLAT_PIXELS] = torch.cat([inputs[FLAT_PIXELS][i, : int(c)] for i, c in enumerate(counts)])
        last_input = (mask_in.long() * idx).argmax(1)  # each row's last real input id
        last_index = text_pos.gather(1, last_input[:, None])[:, 0]
        return inputs, text_pos, last_index

    def _hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final-norm hidden states [B, L, C] of the model's decoder (peft's LoRA layers sit inside it). An
        FSDP2-sharded model (evaluation inside `iqa train`) runs through its root, whose hooks gather the
        parameters; otherwise the decoder alone runs, without the other layers' hidden states."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.model, FSDPModule):
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

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    # --- training -------------------------------------------------------------------------------------

    def add_tokens(self, tokens: list[str] | tuple[str, ...]) -> list[int]:
        """Adds special tokens; the embeddings grow only when the tokenizer outgrows them (Qwen's have spare rows)."""
        self.tokenizer.add_tokens(list(tokens), special_tokens=True)
        ids = [int(self.tokenizer.convert_tokens_to_ids(t)) for t in tokens]
        if len(self.tokenizer) > self.vocab_size:
            with _quiet_transformers():
                self.model.resize_token_embeddings(len(self.tokenizer))
        return ids

    def record_score_tokens(self, ids: list[int] | tuple[int, ...]) -> None:
        self.model.config.score_token_ids = list(ids)

    def encode_training(
        self, question: str, level_token: str, level_token_id: int, *, image_first: bool
    ) -> tuple[list[int], list[int], int]:
        """(input ids, labels, level position) of [image, question] -> "The quality of the image is {level}." in
        the family's chat template; the assistant's turn (through its end-of-turn) is supervised. The image comes
        first in either layout (`image_first` is an mPLUG-Owl2 choice; these templates place the image where
        the message puts it)."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": RESPONSE_TEMPLATE.format(level_token)}]},
        ]
        text = self.processor.apply_chat_template(messages, tokenize=False)
        ids = self.encode_prompt(text)
        asked = self.processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        prefix = self.encode_prompt(asked)
        start = next((t for t, (a, b) in enumerate(zip(ids, prefix, strict=False)) if a != b), len(prefix))
        labels = [IGNORE_INDEX] * start + ids[start:]
        hits = [t for t in range(start, len(ids)) if ids[t] == level_token_id]
        if not hits:
            pieces = self.tokenizer.convert_ids_to_tokens(ids[start:])
            raise UserError(
                f"level {level_token!r}: its token (id {level_token_id}) is not among the response tokens {pieces};"
                " choose level names that tokenize the same inside a sentence"
            )
        return ids, labels, hits[-1]

    def add_regressor(self, dims: list[int]) -> None:
        """Q-Scorer's MLP, Kaiming-normal (fan_in, ReLU) weights and zero biases; kept if there is one."""
        from torch import nn

        from iqa_cli.models.hf_vlm.regressor import Regressor

        if self.regressor is not None:
            return
        width = self.model.get_output_embeddings().weight.shape[1]
        mlp = Regressor(width, dims).to(device=self.device, dtype=torch.float32)
        for module in mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        setattr(self.model, REGRESSOR_ATTR, mlp)

    def _language_model(self) -> torch.nn.Module:
        return (
            self.model.model.language_model
            if hasattr(self.model.model, "language_model")
            else (self.model.model.text_model)
        )

    def _vision_parts(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """(vision encoder, projector) parameters: Qwen-VL's merger sits inside `visual`."""
        inner = self.model.model
        if hasattr(inner, "visual"):
            projector = [*inner.visual.merger.parameters()]
            if hasattr(inner.visual, "deepstack_merger_list"):
                projector += [*inner.visual.deepstack_merger_list.parameters()]
            ids = {id(p) for p in projector}
            return [p for p in inner.visual.parameters() if id(p) not in ids], projector
        vision = inner.vision_tower if hasattr(inner, "vision_tower") else inner.vision_model
        projector = inner.multi_modal_projector if hasattr(inner, "multi_modal_projector") else inner.connector
        extra = [inner.image_newline] if isinstance(getattr(inner, "image_newline", None), torch.nn.Parameter) else []
        return list(vision.parameters()), [*projector.parameters(), *extra]

    def lora_target_modules(self, suffixes: list[str] | tuple[str, ...]) -> list[str]:
        """Full names of the language model's Linear layers ending with a suffix (never vision or projector)."""
        from torch import nn

        language = {id(m) for m in self._language_model().modules()}
        return [
            name
            for name, module in self.model.named_modules()
            if isinstance(module, nn.Linear)
            and id(module) in language
            and any(name == s or name.endswith("." + s) for s in suffixes)
        ]

    def trainable_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        vision, projector = self._vision_parts()
        regressor = self.regressor
        return {
            "output": [self.model.get_output_embeddings().weight],
            "regressor": list(regressor.parameters()) if regressor is not None else [],
            "vision": vision,
            "projector": projector,
        }

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        model = self.model
        with _quiet_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it activation checkpointing
            if not enabled:
                model.gradient_checkpointing_disable()
            elif hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def fsdp_units(self) -> list[torch.nn.Module]:
        """FSDP2 units: the language model's decoder layers and the Q-Scorer MLP."""
        units = [*self._language_model().layers]
        if self.regressor is not None:
            units.append(self.regressor)
        return units

    def training_forward(
        self,
        module: torch.nn.Module,
        visual: VisualInputs,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hidden_at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [N, T, V] at the input ids' own positions (none at the image's), final-norm hidden states [N, C]
        at input positions `hidden_at`. `module` (the model, or peft's wrapper of it) runs as a whole, so FSDP2's
        root hooks and peft's see the call; its own LM head runs at one position only, ours at the text's."""
        inputs, text_pos, _ = self._splice(visual, input_ids, attention_mask)
        out = module(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        hidden = out.hidden_states[-1]  # after the final norm, as `last_hidden_state`
        c = hidden.shape[-1]
        at_text = hidden.gather(1, text_pos[..., None].expand(-1, -1, c))  # N, T, C
        logits = self.model.get_output_embeddings()(at_text)
        picked = at_text.gather(1, hidden_at[:, None, None].expand(-1, 1, c))[:, 0] if hidden_at is not None else None
        return logits, picked

    def save(self, out: Any, *, state: dict | None = None, dtype: Any = None, processing: bool = True) -> None:
        """A standard transformers checkpoint (`save_pretrained`, so `AutoModelForImageTextToText` loads it
        anywhere), the processor, and Q-Scorer's MLP as its own file."""
        from safetensors.torch import save_file

        out = Path(out)
        model = self.model
        regressor = self.regressor
        if dtype is not None:
            model.to(dtype)  # the end of training: written in the dtype it was trained in
        if regressor is not None:
            delattr(model, REGRESSOR_ATTR)
        try:
            if state is not None:
                state = {k: v for k, v in state.items() if not k.startswith(REGRESSOR_ATTR + ".")}
            with _quiet_transformers():
                model.save_pretrained(out, state_dict=state)
        finally:
            if regressor is not None:
                setattr(model, REGRESSOR_ATTR, regressor)
        if processing:
            self.processor.save_pretrained(out)
        if regressor is not None:
            tensors = {k: v.detach().float().cpu().contiguous() for k, v in regressor.state_dict().items()}
            save_file(
                tensors, str(out / REGRESSOR_FILE), metadata={"hidden_dims": ",".join(map(str, regressor.hidden_dims))}
            )

    def save_adapter(self, peft_model: Any, out: Any, base: str | None) -> None:
        """peft's own adapter layout, the trained tensors outside it (vision, projector, resized embeddings), the
        processor and Q-Scorer's MLP."""
        from safetensors.torch import save_file

        out = Path(out)
        peft_model.save_pretrained(str(out))
        config = json.loads((out / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = base
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        resized = getattr(self.model.config, "score_token_ids", None)
        embeddings = {id(self.model.get_output_embeddings().weight), id(self.model.get_input_embeddings().weight)}
        prefix = "base_model.model."
        non_lora = {
            name.removeprefix(prefix): p.detach().cpu().contiguous()
            for name, p in peft_model.named_parameters()
            if "lora_" not in name
            and not name.removeprefix(prefix).startswith(REGRESSOR_ATTR + ".")
            and (p.requires_grad or (resized and id(p) in embeddings))
        }
        save_file(non_lora, str(out / NON_LORA), metadata={"format": "pt"})
        self.model.config.save_pretrained(out)
        self.processor.save_pretrained(out)
        regressor = self.regressor
        if regressor is not None:
            tensors = {k: v.detach().float().cpu().contiguous() for k, v in regressor.state_dict().items()}
            save_file(
                tensors, str(out / REGRESSOR_FILE), metadata={"hidden_dims": ",".join(map(str, regressor.hidden_dims))}
            )

    def load_regressor(self, directory: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(directory / REGRESSOR_FILE), framework="pt") as f:
            dims = [int(d) for d in (f.metadata() or {}).get("hidden_dims", "").split(",") if d]
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        self.add_regressor(dims)
        self.regressor.load_state_dict(tensors)

    processing_files = (
        "processor_config.json",
        "preprocessor_config.json",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        REGRESSOR_FILE,
    )


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


def _check_config(model: str | Path, revision: str | None) -> None:
    """A checkpoint whose config or processor points at remote code is refused (iqa never runs it)."""
    import json

    from iqa_cli.models.backbone import CONFIG_FILE, _cached_hub_file

    path = Path(model).expanduser()
    for name in (CONFIG_FILE, "processor_config.json", "preprocessor_config.json"):
        file = path / name if path.is_dir() else _cached_hub_file(str(model), name, revision)
        if file is None or not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{file}: not readable JSON ({exc})") from None
        if isinstance(data, dict) and "auto_map" in data:
            raise UserError(
                f"{file}: the checkpoint needs remote code (auto_map {sorted(data['auto_map'])});"
                " iqa loads only transformers' own classes"
            )


def _check_processor(processor: Any, source: str) -> None:
    if getattr(processor, "chat_template", None) is None:
        raise UserError(
            f"{source}: the processor has no chat template (chat_template.jinja or chat_template in"
            " processor_config.json); iqa renders its prompt with it"
        )
    if not hasattr(processor, "image_token") or not hasattr(processor, "image_processor"):
        raise UserError(f"{source}: {type(processor).__name__} is not an image-and-text processor")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or warnings from transformers while loading: stderr keeps iqa's one-line messages."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def pixel_options(model_type: str, min_pixels: int | None, max_pixels: int | None, patch: int) -> dict:
    """Qwen-VL's pixel budget: default the papers' fixed 448x448, else the user's bounds (at least one merged
    patch, min <= max)."""
    if model_type not in PATCH_GRID_FAMILIES:
        if min_pixels is not None or max_pixels is not None:
            raise UserError(f"--min-pixels / --max-pixels apply to {', '.join(PATCH_GRID_FAMILIES)}, not {model_type}")
        return {}
    if min_pixels is None and max_pixels is None:
        min_pixels = max_pixels = DEFAULT_PIXELS
    smallest = patch * patch
    for flag, value in (("--min-pixels", min_pixels), ("--max-pixels", max_pixels)):
        if value is not None and value < smallest:
            raise UserError(f"{flag} {value} is below one {patch}x{patch} patch of {model_type} ({smallest} pixels)")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise UserError(f"--min-pixels {min_pixels} is above --max-pixels {max_pixels}")
    bounds = {k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v is not None}
    return {"size": bounds}  # Qwen2VLImageProcessor's pixel-count bounds


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
    path = Path(model).expanduser()
    weights_dir = path if path.is_dir() else None
    adapter = weights_dir is not None and (weights_dir / ADAPTER_CONFIG).is_file()
    if adapter:
        base = base or _adapter_base(weights_dir)
    try:
        with _quiet_transformers():
            processor = AutoProcessor.from_pretrained(str(model), revision=revision, trust_remote_code=False)
            _check_processor(processor, source)  # before any weights are read
            loaded = AutoModelForImageTextToText.from_pretrained(
                str(base if adapter else model),
                revision=None if adapter else revision,
                dtype=dtype or torch.float32,
                trust_remote_code=False,
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
    commit = getattr(loaded.config, "_commit_hash", None) or ""
    provenance = Provenance(
        model=str(path.resolve()) if weights_dir else source,
        revision=commit or "",
        layout="lora" if adapter else "full",
        weights_dir=weights_dir,
        base_model=str(base) if adapter else "",
    )
    backbone = HFVisionLanguageBackbone(loaded, processor, provenance=provenance, images_kwargs=kwargs, source=source)
    if weights_dir is not None and (weights_dir / REGRESSOR_FILE).is_file():
        backbone.load_regressor(weights_dir)
    return backbone


def _trained_pixels(run_dir: Path) -> tuple[int | None, int | None]:
    """The --min-pixels / --max-pixels an `iqa train` run was trained with (its iqa.json), if any."""
    file = run_dir / RUN_FILE
    if not file.is_file():
        return None, None
    train = json.loads(file.read_text()).get("train") or {}
    return train.get("min_pixels"), train.get("max_pixels")


def _adapter_base(run_dir: Path) -> str:
    """The full model a LoRA run applies to: its iqa.json `base`, else the adapter config's."""
    for name, key in ((RUN_FILE, "base"), (ADAPTER_CONFIG, "base_model_name_or_path")):
        file = run_dir / name
        if file.is_file():
            value = json.loads(file.read_text()).get(key)
            if value:
                return str(value)
    raise UserError(f"{run_dir}: a LoRA adapter that names no base model; pass --base")


def _merge_adapter(model: Any, processor: Any, run_dir: Path) -> Any:
    """The base with the run's LoRA merged in and its trained non-LoRA tensors (vision, projector, resized
    embeddings) loaded: the same weights the run ended with."""
    from peft import PeftModel
    from safetensors.torch import load_file

    if len(processor.tokenizer) > model.get_output_embeddings().weight.shape[0]:  # Q-Scorer's added tokens
        model.resize_token_embeddings(len(processor.tokenizer))
    with _quiet_transformers():
        model = PeftModel.from_pretrained(model, str(run_dir)).merge_and_unload()
    if (run_dir / NON_LORA).is_file():
        missing = set(load_file(str(run_dir / NON_LORA))) - set(model.state_dict())
        if missing:
            raise UserError(f"{run_dir / NON_LORA}: tensors the model does not have: {sorted(missing)[:3]}")
        model.load_state_dict(load_file(str(run_dir / NON_LORA)), strict=False)
    return model


FAMILY_NAME = "hf_vlm"
OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",  # peft's model card of an adapter
    NON_LORA,
    REGRESSOR_FILE,
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
FAMILIES = {
    model_type: Family(name=model_type, image_token=token, load=load, output_files=OUTPUT_FILES)
    for model_type, token in IMAGE_TOKENS.items()
}
FAMILY = FAMILIES["qwen2_5_vl"]
