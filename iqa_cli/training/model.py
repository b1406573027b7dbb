"""The model as training sees it: level tokens and the scoring readout, Q-Scorer's regressor, LoRA and the
trainable parts, and `TrainForward`, the one forward pass the optimizer differentiates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from iqa_cli.errors import UserError
from iqa_cli.training import data as train_data
from iqa_cli.training.config import TrainConfig
from iqa_cli.training.objectives import OBJECTIVES

# The reference's `find_all_lora_names`: every q_proj and the visual copy of v_proj in the LLM.
LORA_TARGET_SUFFIXES = ("self_attn.q_proj", "self_attn.v_proj.multiway.1")
SCORE_TOKEN = "<score{}>"


class TrainForward(nn.Module):
    """One forward pass for training: logits at the text positions and, for Q-Scorer, the regressor.

    Logits are computed only where text tokens landed in the expanded sequence (the 65 visual positions
    carry no labels), so `logits[:, t]` belongs to input token t and the losses' shift convention holds.
    The regressor reads the final-norm hidden state of the token just before the score token, the one
    that predicts it; scoring reads the same position (the last input id, `regressor="last"`).
    """

    def __init__(self, model: nn.Module, core: nn.Module):
        super().__init__()
        self.model = model  # the MPLUGOwl2ForCausalLM, or the peft model wrapping it
        object.__setattr__(self, "core", core)  # the MPLUGOwl2ForCausalLM itself, not registered twice

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor,
        regressor_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from iqa_cli.models.mplug_owl2.model import IMAGE_TOKEN_INDEX, expanded_positions, gather_rows

        t = input_ids.shape[1]
        slot = (input_ids == IMAGE_TOKEN_INDEX).long().argmax(1)
        text_pos = expanded_positions(slot, t, self.core.num_visual_tokens)  # N, T
        out = self.model(input_ids, pixel_values, attention_mask=attention_mask, logits_at=text_pos)
        pred = None
        if regressor_pos is not None:
            hidden = gather_rows(out.hidden_states, text_pos.gather(1, regressor_pos[:, None]))[:, 0]  # N, C
            pred = self.core.deepmlp(hidden)
        return out.logits, pred


@dataclass
class Levels:
    """What the model is trained to say and how scoring reads it."""

    names: tuple[str, ...]  # ascending quality
    tokens: tuple[str, ...]  # text of the token each level is read at
    ids: tuple[int, ...]
    prompt: str  # scoring prompt text
    input_ids: tuple[int, ...]  # exact scoring ids (prompt + response pieces before the level token)
    regressor: str | None


def level_setup(config: TrainConfig, names: Sequence[str], tokenizer, core: nn.Module) -> Levels:
    """Level tokens (words, or added `<scoreK>` tokens with resized embeddings) and the scoring readout."""
    from iqa_cli.models.mplug_owl2.tokenizer import (
        DEFAULT_PROMPT,
        DEFAULT_QUESTION,
        EVAL_TEMPLATE,
        level_token_ids,
        tokenize_prompt,
    )

    objective = OBJECTIVES[config.method]
    k = len(names)
    if objective.score_tokens:
        tokens = tuple(SCORE_TOKEN.format(i + 1) for i in range(k))
        ids = tuple(tokenizer.add_tokens(tokens, special=True))
        vocab = core.config.language.vocab_size
        if len(tokenizer) > vocab:  # new rows start as the mean of the others (the reference's resize)
            core.resize_token_embeddings(len(tokenizer))
    else:
        tokens = tuple(names)
        ids = tuple(level_token_ids(tokenizer, tokens))
    prompt = DEFAULT_PROMPT
    prefix = tokenize_prompt(tokenizer, prompt)
    scoring = train_data.encode_conversations(tokenizer, [DEFAULT_QUESTION], tokens, ids, EVAL_TEMPLATE)
    heads = {enc.input_ids[: enc.level_pos] for enc in scoring.values()}
    if len(heads) != 1:
        raise UserError(f"the level tokens {list(tokens)} are preceded by different response pieces")
    input_ids = heads.pop()
    if tuple(input_ids[: len(prefix)]) != tuple(prefix):
        raise UserError(f"the scoring prompt {prompt!r} does not tokenize as the start of the training response")
    return Levels(
        names=tuple(names),
        tokens=tokens,
        ids=ids,
        prompt=prompt,
        input_ids=tuple(input_ids),
        regressor="last" if objective.regressor else None,
    )


def add_regressor(config: TrainConfig, core: nn.Module) -> None:
    """Q-Scorer's MLP, Kaiming-normal (fan_in, ReLU) weights and zero biases as the reference initializes it."""
    from iqa_cli.models.mplug_owl2.regressor import ScoreRegressor

    if core.deepmlp is not None:
        return
    dims = [int(d) for d in config.model.mlp_dims]
    weight = core.lm_head.weight
    mlp = ScoreRegressor(core.config.language.hidden_size, dims).to(device=weight.device, dtype=torch.float32)
    for module in mlp.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    core.deepmlp = mlp
    core.config.deepmlp_hidden_dims = dims


def lora_target_names(core: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Full names of the LLM Linear layers LoRA wraps (never inside the vision model or abstractor)."""
    names = [
        name
        for name, module in core.named_modules()
        if isinstance(module, nn.Linear)
        and name.startswith("model.layers.")
        and any(name == s or name.endswith("." + s) for s in suffixes)
    ]
    if not names:
        raise UserError(f"--lora-targets {list(suffixes)} match no linear layer of the language model")
    return names


def apply_lora(config: TrainConfig, core: nn.Module) -> nn.Module:
    """The peft model wrapping `core` with LoRA on the target layers."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_names(core, config.lora.targets or LORA_TARGET_SUFFIXES)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=targets,
        bias="none",
    )
    return get_peft_model(core, lora)


def select_trainable(config: TrainConfig, core: nn.Module, lora: bool) -> None:
    """requires_grad as the reference sets it: LoRA weights (or the whole LLM), the vision model and the
    abstractor unless frozen; Q-Scorer also trains lm_head and the regressor in LoRA runs."""
    objective = OBJECTIVES[config.method]
    for name, p in core.named_parameters():
        p.requires_grad = ("lora_" in name) if lora else True
    if objective.score_tokens:
        core.lm_head.weight.requires_grad = True
    if core.deepmlp is not None:  # trained by Q-Scorer; kept as it is (and unused) by the other methods
        for p in core.deepmlp.parameters():
            p.requires_grad = objective.regressor
    vision, abstractor = core.model.vision_model, core.model.visual_abstractor
    for p in vision.parameters():
        p.requires_grad = not config.model.freeze_vision
    for p in abstractor.parameters():
        p.requires_grad = not config.model.freeze_abstractor
