"""`iqa train`'s hooks for a transformers vision-language model (a mixin of `HFVisionLanguageBackbone`): added
score tokens, supervised chat-template encoding, Q-Scorer's MLP, parameter groups, LoRA targets, FSDP2 units and
the training forward."""

from __future__ import annotations

import warnings

import torch

from iqa_cli.constants import IGNORE_INDEX, RESPONSE_PREFIX
from iqa_cli.errors import UserError
from iqa_cli.models.backbone import VisualInputs
from iqa_cli.models.hf_vlm.checkpoints import REGRESSOR_ATTR, _quiet_transformers


class TrainingMixin:
    """Training hooks of the `Backbone` interface."""

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
        self,
        question: str,
        level_token: str,
        level_token_id: int,
        *,
        image_first: bool,
        response_prefix: str = RESPONSE_PREFIX,
    ) -> tuple[list[int], list[int], int]:
        """(input ids, labels, level position) of [image, question] -> "The quality of the image is {level}." in
        the family's chat template; the assistant's turn (through its end-of-turn) is supervised. The image comes
        first in either layout (`image_first` is an mPLUG-Owl2 choice; these templates place the image where
        the message puts it)."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"{response_prefix} {level_token}."}]},
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

        from iqa_cli.models.score_regressor import ScoreRegressor

        if self.regressor is not None:
            return
        width = self.model.get_output_embeddings().weight.shape[1]
        mlp = ScoreRegressor(width, dims).to(device=self.device, dtype=torch.float32)
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

    def _unreached_vision(self) -> list[torch.nn.Parameter]:
        """Vision parameters the image features never pass through. LLaVA-OneVision reads the tower's hidden states
        at `vision_feature_layer` (-1: the last layer's output, before `post_layernorm`), so the post-layernorm,
        SigLIP's pooling head and any layer after the one read get no gradient; DDP would stop at step 2 waiting
        for theirs."""
        layer = getattr(self.model.config, "vision_feature_layer", None)
        tower = getattr(self.model.model, "vision_tower", None)
        if layer is None or tower is None:
            return []
        vision = getattr(tower, "vision_model", tower)
        layers = vision.encoder.layers
        read = layer if isinstance(layer, list | tuple) else [layer]
        deepest = max(int(i) % (len(layers) + 1) for i in read)  # hidden_states[i] is layer i's output, 0 the input
        unreached = [*layers[deepest:], getattr(vision, "post_layernorm", None), getattr(vision, "head", None)]
        return [p for module in unreached if module is not None for p in module.parameters()]

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
        unused = self._unreached_vision()
        unreached = {id(p) for p in unused}
        regressor = self.regressor
        return {
            "output": [self.model.get_output_embeddings().weight],
            "regressor": list(regressor.parameters()) if regressor is not None else [],
            "vision": [p for p in vision if id(p) not in unreached],
            "projector": projector,
            "unused": unused,
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
