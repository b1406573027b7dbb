"""Reasoning quality models: the prompt presets of the released recipes and how a number is read from an answer.

A preset is the conversation a model is asked (an optional system message, then the image and the question, in
the family's chat template with the generation prompt) and the rule that reads the number from its answer. The
texts are the authors' own, as their training scripts send them:

- `q-insight` (Q-Insight, bytedance/Q-Insight `src/open-r1-multimodal/src/open_r1/qinsight_multi_task.py`): a
  system message that asks for `<think> </think>` then `<answer> </answer>`, the image, then a question that asks
  for a JSON `"rating"`; the number is the `"rating"` of the first `<answer>...</answer>`.
- `visualquality-r1` (VisualQuality-R1, TianheWu/VisualQuality-R1 `grpo_jsonl.py` with the scoring question
  template of `vlm_modules/qwen_module.py`): no system message (the template's default), the image, the question
  followed by the thinking instruction; the number is the first number of the last `<answer>...</answer>`, or of
  the whole text when it has none.
- `visualquality-r1-nothink`: the same question with the authors' non-thinking instruction ("only output the final
  answer"), which answers in a few tokens.

Both authors score with the image before the question, as they train (Q-Insight's demo script puts it after, and
VisualQuality-R1's README renders `add_vision_id=True`, "Picture 1: ", which its training did not). Where their
evaluation scripts meet an answer without a number they substitute `random.randint(1, 5)`; `iqa` never guesses:
`parse_answer` returns None and the row is an error (scoring), or the reward decides (training).

Imports nothing heavy: the option declarations read `PRESETS` from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_QINSIGHT_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)
_QINSIGHT_QUESTION = (
    "What is your overall rating on the quality of this picture? The rating should be a float between 1 and 5, "
    "rounded to two decimal places, with 1 representing very poor quality and 5 representing excellent quality. "
    'Return the final answer in JSON format with the following keys: "rating": The score.'
)
_VQR1_QUESTION = (
    "You are doing the image quality assessment task. Here is the question: "
    "What is your overall rating on the quality of this picture? The rating should be a float between 1 and 5, "
    "rounded to two decimal places, with 1 representing very poor quality and 5 representing excellent quality."
)
_VQR1_THINK = (
    " First output the thinking process in <think> </think> tags and then output the final answer with only one "
    "score in <answer> </answer> tags."
)
_VQR1_NO_THINK = " Please only output the final answer with only one score in <answer> </answer> tags."

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_RATING = re.compile(r"\"rating\"\s*:\s*([\d\.]+)")  # Q-Insight's `score_pattern`
_NUMBER = re.compile(r"-?\d+(\.\d+)?")  # VisualQuality-R1's `extract_first_number`

# The format rewards' patterns, matched against the whole completion (`re.fullmatch`).
_QINSIGHT_FORMAT = re.compile(
    r"^<think>\s*\n.*?\n\s*</think>\s*\n<answer>\s*\n\{[^\{\}]*\}\s*\n\s*</answer>\s*$", re.DOTALL | re.MULTILINE
)
_VQR1_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_ANSWER_ONLY_FORMAT = re.compile(r"\s*<answer>.*?</answer>\s*", re.DOTALL)


@dataclass(frozen=True)
class Answer:
    """The number an answer gives, and where its first digit stands in the text (the digit-probability readout)."""

    value: float
    digit_at: int  # index into the text of the number's first digit


@dataclass(frozen=True)
class ReasoningPreset:
    """A released recipe's conversation and answer rule."""

    name: str
    question: str  # the user's text, after the image
    system: str | None  # a system message, or None for the chat template's default
    answer_rule: str  # "rating": Q-Insight's JSON "rating" | "number": VisualQuality-R1's first number
    format_pattern: re.Pattern  # what the format reward accepts (the whole completion)
    thinking: bool  # the answer follows a <think> block
    max_new_tokens: int  # scoring's default generation budget

    def messages(self) -> list[dict]:
        """The conversation in the chat-template message format (the image as a placeholder part)."""
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}
        if self.system is None:
            return [user]
        return [{"role": "system", "content": [{"type": "text", "text": self.system}]}, user]

    def parse(self, text: str) -> Answer | None:
        """The number the answer gives, or None when it gives none (never a guess)."""
        if self.answer_rule == "rating":
            found = _ANSWER.search(text)
            if found is None:
                return None
            rating = _RATING.search(found.group(1).strip())
            if rating is None:
                return None
            try:
                value = float(rating.group(1))  # "3.4.5" matches the pattern and is no number
            except ValueError:
                return None
            start = found.start(1) + (len(found.group(1)) - len(found.group(1).lstrip()))
            digits = rating.start(1) + start
            return Answer(value, digits + _first_digit(rating.group(1)))
        blocks = list(_ANSWER.finditer(text))
        if blocks:
            block = blocks[-1]
            inner = block.group(1)
            offset = block.start(1) + (len(inner) - len(inner.lstrip()))
            answer = inner.strip()
        else:
            offset = len(text) - len(text.lstrip())
            answer = text.strip()
        number = _NUMBER.search(answer)
        if number is None:
            return None
        return Answer(float(number.group()), offset + number.start() + _first_digit(number.group()))

    def well_formed(self, text: str) -> bool:
        """The format reward's test: the whole completion has the recipe's shape."""
        return self.format_pattern.fullmatch(text) is not None


def _first_digit(number: str) -> int:
    return next(i for i, c in enumerate(number) if c.isdigit())


PRESETS: dict[str, ReasoningPreset] = {
    p.name: p
    for p in (
        ReasoningPreset("q-insight", _QINSIGHT_QUESTION, _QINSIGHT_SYSTEM, "rating", _QINSIGHT_FORMAT, True, 1024),
        ReasoningPreset("visualquality-r1", _VQR1_QUESTION + _VQR1_THINK, None, "number", _VQR1_FORMAT, True, 1024),
        ReasoningPreset(
            "visualquality-r1-nothink", _VQR1_QUESTION + _VQR1_NO_THINK, None, "number", _ANSWER_ONLY_FORMAT, False, 64
        ),
    )
}
PRESET_NAMES = tuple(PRESETS)
GRPO = "grpo"  # `iqa train --method grpo`: reinforcement learning of a reasoning model through TRL (`training/grpo.py`)
DIGITS = ("1", "2", "3", "4", "5")  # the digit-probability readout's levels, ascending quality (the 1-5 scale)


def preset(name: str) -> ReasoningPreset:
    from iqa_cli.errors import UserError

    if name not in PRESETS:
        raise UserError(f"reasoning preset {name!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[name]
