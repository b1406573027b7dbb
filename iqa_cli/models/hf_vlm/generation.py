"""Greedy generation of a transformers vision-language model (a mixin of `HFVisionLanguageBackbone`): what reasoning
models answer through (`iqa score --reasoning`, the evaluation of `iqa train --method grpo`).

Rows are left-padded (`_splice(left=True)`) so that every row's next token is read at the last position; the model's
own `generate` decodes with its KV cache. Decoding is greedy with no repetition penalty and nothing else from the
checkpoint's `generation_config.json` (whose sampling settings would make a score change from run to run): the same
image and batch give the same tokens. A logits processor keeps the logits of a few ids (the digits) at every
generated position, so no [B, steps, vocabulary] tensor is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iqa_cli.models.backbone import VisualInputs
from iqa_cli.models.hf_vlm.preprocess import HAS_IMAGE


@dataclass
class Generated:
    """What greedy decoding gave each row of a batch."""

    ids: list[list[int]]  # B: the new ids up to (not including) the end of sequence; [] for rows without an image
    recorded: torch.Tensor  # B, S, K float32: the logits of the recorded ids at each generated position (S steps)
    finished: list[bool]  # B: the row ended with an end-of-sequence token (not at max_new_tokens)


class _RecordLogits:
    """A `LogitsProcessor` that keeps `scores[:, ids]` of every step and changes nothing."""

    def __init__(self, ids: tuple[int, ...]):
        self.ids = list(ids)
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(scores[:, self.ids].float().cpu())
        return scores


class GenerationMixin:
    """The conversation prompt and greedy batched decoding."""

    def render_conversation(self, messages: list[dict]) -> str:
        """The family's chat template over `messages` (one image placeholder) with the generation prompt."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.with_one_image_token(text)

    def end_of_sequence_ids(self) -> list[int]:
        """The ids that end an answer: the generation config's (Qwen-VL: end of turn and end of text) and the
        tokenizer's."""
        configured = self.model.generation_config.eos_token_id
        ids = [configured] if isinstance(configured, int) else list(configured or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def generate_greedy(
        self, visual: VisualInputs, input_ids: torch.Tensor, *, max_new_tokens: int, record_ids: tuple[int, ...] = ()
    ) -> Generated:
        """Rows without an image (`has_image` 0: padding, failed images) are not decoded."""
        from transformers import GenerationConfig, LogitsProcessorList

        b = input_ids.shape[0]
        has = visual[HAS_IMAGE].bool().cpu() if HAS_IMAGE in visual else torch.ones(b, dtype=torch.bool)
        rows = has.nonzero()[:, 0]
        empty = Generated([[] for _ in range(b)], torch.zeros(b, 0, len(record_ids)), [False] * b)
        if len(rows) == 0:
            return empty
        if len(rows) < b:
            sub = {name: value[rows.to(value.device)] for name, value in visual.items()}
            part = self.generate_greedy(sub, input_ids[rows], max_new_tokens=max_new_tokens, record_ids=record_ids)
            recorded = torch.zeros(b, part.recorded.shape[1], len(record_ids))
            recorded[rows] = part.recorded
            ids, finished = empty.ids, empty.finished
            for j, row in enumerate(rows.tolist()):
                ids[row], finished[row] = part.ids[j], part.finished[j]
            return Generated(ids, recorded, finished)
        inputs, _, _ = self._splice(visual, input_ids.to(self.device), None, left=True)
        eos = self.end_of_sequence_ids()
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        recorder = _RecordLogits(record_ids)
        # transformers fills every setting left unset from the model's own generation config (a checkpoint's
        # no_repeat_ngram_size, suppress_tokens, min_new_tokens...): a bare one stands in while this call runs.
        own, self.model.generation_config = self.model.generation_config, GenerationConfig()
        try:
            out = self.model.generate(
                **inputs, generation_config=config, logits_processor=LogitsProcessorList([recorder])
            )
        finally:
            self.model.generation_config = own
        new = out[:, inputs["input_ids"].shape[1] :].cpu().tolist()
        ids, finished = [], []
        for row in new:
            end = next((i for i, token in enumerate(row) if token in eos), None)
            ids.append(row if end is None else row[:end])
            finished.append(end is not None)
        recorded = torch.stack(recorder.steps, 1) if recorder.steps else torch.zeros(b, 0, len(record_ids))
        return Generated(ids, recorded, finished)

    def decode_text(self, ids: list[int]) -> str:
        """Generated ids as text, special tokens left out (as the papers' scripts decode)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_at(self, ids: list[int], char: int) -> int | None:
        """Which of `ids` holds character `char` of `decode_text(ids)` (a binary search over decoded prefixes:
        once a prefix holds the character, every longer one does)."""
        text = self.decode_text(ids)
        if char >= len(text):
            return None
        want = text[: char + 1]
        low, high = 1, len(ids)
        if not self.decode_text(ids[:high]).startswith(want):
            return None
        while low < high:
            mid = (low + high) // 2
            if self.decode_text(ids[:mid]).startswith(want):
                high = mid
            else:
                low = mid + 1
        return low - 1
