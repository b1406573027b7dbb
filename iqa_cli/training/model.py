"""The model as training sees it: level tokens and the scoring readout, Q-Scorer's regressor, LoRA and the
trainable parts, and `TrainForward`, the one forward pass the optimizer differentiates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from iqa_cli.constants import DEFAULT_QUESTION
from iqa_cli.errors import UserError
from iqa_cli.training import data as train_data
from iqa_cli.training.config import TrainConfig
from iqa_cli.training.objectives import OBJECTIVES

SCORE_TOKEN = "<score{}>"


class TrainForward(nn.Module):
    """One forward pass for training: logits at the input ids' positions and, for Q-Scorer, the regressor.

    `logits[:, t]` belongs to input token t (the backbone maps input ids to its own sequence), so the losses'
    shift convention holds. The regressor reads the final-norm hidden state of the token just before the
    score token, the one that predicts it; scoring reads the same position (the last input id,
    `regressor="last"`).
    """

    def __init__(self, model: nn.Module, backbone: Any):
        super().__init__()
        self.model = model  # the backbone's model, or the peft model wrapping it
        object.__setattr__(self, "backbone", backbone)  # its model is `model` (or inside it), not registered twice

    def forward(
        self,
        input_ids: torch.Tensor,
        visual: dict[str, torch.Tensor],
        attention_mask: torch.Tensor,
        regressor_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, hidden = self.backbone.training_forward(self.model, visual, input_ids, attention_mask, regressor_pos)
        pred = self.backbone.regress(hidden) if hidden is not None else None  # N
        return logits, pred


@dataclass
class Levels:
    """What the model is trained to say and how scoring reads it."""

    names: tuple[str, ...]  # ascending quality
    tokens: tuple[str, ...]  # text of the token each level is read at
    ids: tuple[int, ...]
    prompt: str  # scoring prompt text
    input_ids: tuple[int, ...]  # exact scoring ids (prompt + response pieces before the level token)
    regressor: str | None


def level_setup(config: TrainConfig, names: Sequence[str], backbone: Any) -> Levels:
    """Level tokens (words, or added `<scoreK>` tokens with resized embeddings) and the scoring readout."""
    objective = OBJECTIVES[config.method]
    k = len(names)
    if objective.score_tokens:
        tokens = tuple(SCORE_TOKEN.format(i + 1) for i in range(k))
        ids = tuple(backbone.add_tokens(tokens))
    else:
        tokens = tuple(names)
        ids = tuple(backbone.level_token_ids(tokens))
    prompt = backbone.default_prompt
    prefix = backbone.encode_prompt(prompt)
    scoring = train_data.encode_conversations(backbone, [DEFAULT_QUESTION], tokens, ids, image_first=False)
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


def add_regressor(config: TrainConfig, backbone: Any) -> None:
    """The backbone's regression head (Q-Scorer's MLP) with --mlp-dims hidden sizes."""
    backbone.add_regressor([int(d) for d in config.model.mlp_dims])


def lora_target_names(backbone: Any, suffixes: Sequence[str]) -> list[str]:
    """Full names of the LLM Linear layers LoRA wraps (never inside the vision model or projector)."""
    names = backbone.lora_target_modules(tuple(suffixes))
    if not names:
        raise UserError(f"--lora-targets {list(suffixes)} match no linear layer of the language model")
    return names


def apply_lora(config: TrainConfig, backbone: Any) -> nn.Module:
    """The peft model wrapping the backbone's model with LoRA on the target layers (by default the family's)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_names(backbone, config.lora.targets or backbone.lora_targets)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=targets,
        bias="none",
    )
    return get_peft_model(backbone.model, lora)


def select_trainable(config: TrainConfig, backbone: Any, lora: bool) -> None:
    """requires_grad as the reference sets it: LoRA weights (or the whole LLM), the vision model and the
    projector unless frozen; Q-Scorer also trains the output embeddings and the regressor in LoRA runs. The
    family's "unused" group (parameters its forward never reaches) is frozen: they would get no gradient,
    which DDP cannot reduce."""
    objective = OBJECTIVES[config.method]
    for name, p in backbone.model.named_parameters():
        p.requires_grad = ("lora_" in name) if lora else True
    groups = backbone.trainable_groups()
    if objective.score_tokens:
        for p in groups["output"]:
            p.requires_grad = True
    for p in groups["regressor"]:  # trained by Q-Scorer; kept as it is (and unused) by the other methods
        p.requires_grad = objective.regressor
    for p in groups["vision"]:
        p.requires_grad = not config.model.freeze_vision
    for p in groups["projector"]:
        p.requires_grad = not config.model.freeze_abstractor
    for p in groups.get("unused", []):  # what the forward never reaches: no gradient, so not trained
        p.requires_grad = False
