"""Scoring reasoning models deterministically: greedy generation, the number in the answer, the digit probabilities.

The rule (README, "Reasoning models"):

- the model answers the preset's conversation (`iqa_cli.reasoning`) by greedy decoding with the KV cache, up to
  `max_new_tokens`: no sampling, so the same image always gives the same answer (the authors sample at
  temperature 1, so their scores change from run to run);
- `score` is the number the answer gives, read by the preset's rule; an answer that gives none is an error row
  holding the generated text (the authors' scripts substitute a random integer);
- where that number's first digit was generated as a token of its own and "1".."5" are one token each, the logits
  of those five tokens at that position give `probs` (closed-set softmax, ascending quality), `score_soft`
  (sum p_i i) and `std`, as the level readout does; elsewhere these are missing (NaN).

Rows are decoded together, left-padded. Which tokens come out does not depend on a row's batch-mates unless two
candidates tie to the last bits: the logits of a row move by about 1e-7 (float32, CPU) with the shape of the call
(the CPU's matrix kernels sum in another order for another number of rows), never with its content. A run with
the same batch size gives bit-identical results; `--batch-size 1` scores every image alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from iqa_cli.errors import UserError
from iqa_cli.reasoning import DIGITS, ReasoningPreset
from iqa_cli.scoring.moments import level_moments


@dataclass(frozen=True)
class ReasoningReadout:
    """What goes into the model and how its answer is read."""

    preset: ReasoningPreset
    input_ids: tuple[int, ...]  # the rendered conversation (its image slot once), then the generation prompt
    prompt: str  # the text the ids came from (for provenance)
    max_new_tokens: int
    digit_ids: tuple[int, ...]  # the ids of "1".."5", or () when one of them is several tokens
    level_names: tuple[str, ...] = DIGITS
    regressor: None = None  # no regression head (`Scorer.has_regressor`)

    @property
    def level_token_ids(self) -> tuple[int, ...]:
        """The digit ids, read where the answer's first digit was generated."""
        return self.digit_ids

    @property
    def centers(self) -> torch.Tensor:
        return torch.tensor([float(d) for d in self.level_names])

    def read(self, backbone, visual) -> ReasoningBatch:
        return read_reasoning(backbone, visual, self)


@dataclass
class ReasoningBatch:
    """Per-image results of one batch, float32 on the CPU (`ScoreBatch`'s fields and the answers' own)."""

    probs: torch.Tensor  # B, 5: digit probabilities at the answer's first digit (NaN rows: no such readout)
    score: torch.Tensor  # B: the number in the answer (NaN: none, see `errors`)
    std: torch.Tensor  # B: spread of the digit probabilities (NaN with probs)
    score_soft: torch.Tensor  # B: sum p_i i over the digit probabilities (NaN with probs)
    errors: list[str | None]  # B: why a row has no score (the answer gave no number), with the generated text
    texts: list[str]  # B: the generated text of each row
    score_reg: None = None


def build_reasoning_readout(backbone, preset: ReasoningPreset, max_new_tokens: int | None) -> ReasoningReadout:
    """The readout of `preset` on a family that generates (`models.backbone.GeneratingBackbone`)."""
    from iqa_cli.models.backbone import GeneratingBackbone

    if not isinstance(backbone, GeneratingBackbone):
        raise UserError(f"the {backbone.name} family does not generate text: --reasoning needs a transformers family")
    budget = preset.max_new_tokens if max_new_tokens is None else max_new_tokens
    if budget < 1:
        raise UserError(f"--max-new-tokens {budget}: must be at least 1")
    prompt = backbone.render_conversation(preset.messages())
    ids = tuple(backbone.encode_prompt(prompt))
    return ReasoningReadout(preset, ids, prompt, budget, digit_token_ids(backbone.tokenizer))


def digit_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids of "1".."5" when each is one token on its own, else ()."""
    ids = []
    for digit in DIGITS:
        encoded = tokenizer.encode(digit, add_special_tokens=False)
        if len(encoded) != 1:
            return ()
        ids.append(int(encoded[0]))
    return tuple(ids)


@torch.inference_mode()
def read_reasoning(backbone, visual, readout: ReasoningReadout) -> ReasoningBatch:
    """Greedy answers for a collated batch -> ReasoningBatch."""
    b = next(iter(visual.values())).shape[0]
    ids = torch.tensor(readout.input_ids, dtype=torch.long).expand(b, -1)
    generated = backbone.generate_greedy(
        visual, ids, max_new_tokens=readout.max_new_tokens, record_ids=readout.digit_ids
    )
    nan = torch.full((b,), math.nan)
    score, soft, std = nan.clone(), nan.clone(), nan.clone()
    probs = torch.full((b, len(readout.level_names)), math.nan)
    errors: list[str | None] = [None] * b
    texts: list[str] = []
    for row, tokens in enumerate(generated.ids):
        text = backbone.decode_text(tokens)
        texts.append(text)
        if not tokens and not generated.finished[row]:  # a row without an image: nothing was decoded
            continue
        answer = readout.preset.parse(text)
        if answer is None:
            cut = "" if generated.finished[row] else f" (cut at --max-new-tokens {readout.max_new_tokens})"
            errors[row] = f"the answer gives no number{cut}: {text!r}"
            continue
        score[row] = answer.value
        at = backbone.token_at(tokens, answer.digit_at) if readout.digit_ids else None
        if at is not None and backbone.decode_text([tokens[at]]) == text[answer.digit_at]:
            p, mean, spread = level_moments(generated.recorded[row, at][None], readout.centers)
            probs[row], soft[row], std[row] = p[0], mean[0], spread[0]
    return ReasoningBatch(probs, score, std, soft, errors, texts)
