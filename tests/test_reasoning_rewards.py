"""The reasoning presets' answer rules and the GRPO rewards (iqa_cli/reasoning.py, iqa_cli/training/rewards.py)
against hand computations on fixed answers."""

import math

import numpy as np
import pytest

from iqa_cli.reasoning import PRESETS
from iqa_cli.training import rewards

QINSIGHT, VQR1, NOTHINK = PRESETS["q-insight"], PRESETS["visualquality-r1"], PRESETS["visualquality-r1-nothink"]
QINSIGHT_GOOD = '<think>\nsharp, well exposed\n</think>\n<answer>\n{"rating": 3.45}\n</answer>'


def test_the_presets_hold_the_authors_texts():
    """The conversations the released checkpoints were trained with, word for word: Q-Insight's `SYSTEM_PROMPT` and
    `SCORE_QUESTION_PROMPT` (`qinsight_multi_task.py`), VisualQuality-R1's scoring question formatted into its
    thinking template (`qwen_module.py`) and into its README's non-thinking one, typed out here from those files."""
    rating = (
        "What is your overall rating on the quality of this picture? The rating should be a float between 1 and 5, "
        "rounded to two decimal places, with 1 representing very poor quality and 5 representing excellent quality."
    )
    assert QINSIGHT.system == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
        "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
        "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
        "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
    )
    assert QINSIGHT.question == (
        rating + ' Return the final answer in JSON format with the following keys: "rating": The score.'
    )
    vq_question = "You are doing the image quality assessment task. Here is the question: " + rating
    assert VQR1.system is None and NOTHINK.system is None
    assert VQR1.question == (
        vq_question + " First output the thinking process in <think> </think> tags and then output the final answer "
        "with only one score in <answer> </answer> tags."
    )
    assert NOTHINK.question == (
        vq_question + " Please only output the final answer with only one score in <answer> </answer> tags."
    )
    image_first = VQR1.messages()[0]["content"]
    assert [part["type"] for part in image_first] == ["image", "text"]  # the image, then the question, as trained
    assert [m["role"] for m in QINSIGHT.messages()] == ["system", "user"]


@pytest.mark.parametrize(
    "preset, text, value, digit",
    [
        (QINSIGHT, QINSIGHT_GOOD, 3.45, "3"),
        (QINSIGHT, '<answer>{"rating": .5}</answer>', 0.5, "5"),
        (QINSIGHT, '<answer>{"rating": 3.4.5}</answer>', None, None),  # the pattern matches, float() does not
        (QINSIGHT, '<answer>{"score": 3}</answer>', None, None),  # no "rating"
        (QINSIGHT, '{"rating": 3}', None, None),  # no <answer>
        (QINSIGHT, '<answer>{"rating": 2}</answer><answer>{"rating": 4}</answer>', 2.0, "2"),  # the first block
        (VQR1, "<think>blur</think> <answer> 3.45 </answer>", 3.45, "3"),
        (VQR1, "<answer>2</answer> then <answer>4.5</answer>", 4.5, "4"),  # the last block
        (VQR1, "no tags, but a 4 in the text and a 2", 4.0, "4"),  # no block: the whole text's first number
        (VQR1, "<answer>-1</answer>", -1.0, "1"),
        (VQR1, "<answer>good</answer> 3", None, None),  # a block without a number: not the text's 3
        (VQR1, "", None, None),
        (NOTHINK, "<answer>4</answer>", 4.0, "4"),
    ],
)
def test_each_preset_reads_the_number_and_where_its_first_digit_is(preset, text, value, digit):
    answer = preset.parse(text)
    if value is None:
        assert answer is None
    else:
        assert answer.value == value and text[answer.digit_at] == digit


@pytest.mark.parametrize(
    "preset, text, ok",
    [
        (QINSIGHT, QINSIGHT_GOOD, True),
        (QINSIGHT, '<think>x</think><answer>{"rating": 3}</answer>', False),  # Q-Insight asks for the line breaks
        (QINSIGHT, '<think>\nx\n</think>\n<answer>\n{"rating": "good"}\n</answer>', True),  # shape only: non-numeric
        (QINSIGHT, QINSIGHT_GOOD + '\n<answer>\n{"rating": 2}\n</answer>', False),  # two answers
        (QINSIGHT, '<answer>\n{"rating": 3}\n</answer>', False),  # no <think>
        (VQR1, "<think>fine detail</think><answer>3.45</answer>", True),
        (VQR1, "<think>x</think>\n <answer>good</answer>", True),  # non-numeric: shape only
        (VQR1, "<think>x</think><answer>3</answer><answer>4</answer>", True),  # its fullmatch admits two blocks
        (VQR1, "<answer>3</answer>", False),  # missing <think>
        (VQR1, "<think>x</think><answer>3", False),  # missing </answer>
        (VQR1, "<think>x</think><answer>3</answer> more", False),  # text after the answer
        (NOTHINK, " <answer>3.2</answer>\n", True),
        (NOTHINK, "<think>x</think><answer>3.2</answer>", False),
    ],
)
def test_format_reward_accepts_exactly_the_presets_shape(preset, text, ok):
    assert rewards.format_rewards([text], preset) == [float(ok)]


def test_threshold_reward_is_one_strictly_within_the_threshold_and_zero_without_a_number():
    texts = ["<answer>3.3</answer>", "<answer>3.36</answer>", "<answer>none</answer>", "<answer>4.0</answer>"]
    values = rewards.answer_values(texts, VQR1)
    assert values == [3.3, 3.36, None, 4.0]
    # |3.3 - 3| = 0.3 < 0.35; |3.36 - 3| = 0.36; no number; |4.0 - 3.7| = 0.3 (float: 0.2999...)
    assert rewards.threshold_rewards(values, [3.0, 3.0, 3.0, 3.7], 0.35) == [1.0, 0.0, 0.0, 1.0]
    assert rewards.threshold_rewards([3.5], [3.0], 0.5) == [0.0]  # strict, as Q-Insight's `<`


def test_fidelity_reward_of_two_images_by_hand():
    """Image 0 (MOS 4) answered 3 and 4, image 1 (MOS 2) answered 2 and 2 (G = 2).

    mean_0 = 3.5, var_0 = 0.5 (G - 1 in the denominator), mean_1 = 2, var_1 = 0. Image 0 is the better (g = 1):
    answer 3 -> p = Phi((3 - 2) / sqrt(0.5 + 1e-6)), r = sqrt(p + 1e-6) + sqrt(0 + 1e-6). Image 1 (g = 0):
    answer 2 -> p = Phi((2 - 3.5) / sqrt(0 + 0.5 + 1e-6)), r = sqrt(0 + 1e-6) + sqrt(1 - p + 1e-6)."""
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    eps = 1e-6
    p00, p01 = phi(1 / math.sqrt(0.5 + eps)), phi(2 / math.sqrt(0.5 + eps))
    p1 = phi(-1.5 / math.sqrt(0.5 + eps))
    expected = [
        math.sqrt(p00 + eps) + math.sqrt(eps),
        math.sqrt(p01 + eps) + math.sqrt(eps),
        math.sqrt(eps) + math.sqrt(1 - p1 + eps),
        math.sqrt(eps) + math.sqrt(1 - p1 + eps),
    ]
    got = rewards.fidelity_rewards([3.0, 4.0, 2.0, 2.0], [4.0, 4.0, 2.0, 2.0], group=2)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert expected[0] == pytest.approx(0.96087, abs=1e-5)


def test_fidelity_reward_averages_over_the_other_images_with_their_group_statistics():
    """Three images, G = 3, equal MOS for two of them (g = 1/2): a scalar float64 loop over the definition."""
    values = [3.0, 3.5, 2.5, 1.0, 1.5, 1.0, 4.0, 4.5, 5.0]
    mos = [3.0] * 3 + [3.0] * 3 + [4.5] * 3
    g, n = 3, 3
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    groups = [values[i * g : (i + 1) * g] for i in range(n)]
    mean = [sum(x) / g for x in groups]
    var = [sum((v - m) ** 2 for v in x) / (g - 1) for x, m in zip(groups, mean, strict=True)]
    expected = []
    for i in range(n):
        for s in groups[i]:
            total = 0.0
            for k in range(n):
                if k == i:
                    continue
                p = phi((s - mean[k]) / math.sqrt(var[i] + var[k] + 1e-6))
                t = 1.0 if mos[i * g] > mos[k * g] else 0.0 if mos[i * g] < mos[k * g] else 0.5
                total += math.sqrt(p * t + 1e-6) + math.sqrt((1 - p) * (1 - t) + 1e-6)
            expected.append(total / (n - 1))
    np.testing.assert_allclose(rewards.fidelity_rewards(values, mos, group=g), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="two at least"):
        rewards.fidelity_rewards([3.0, 4.0], [3.0, 3.0], group=2)


def test_unparsed_answers_get_the_references_random_integer_from_a_seeded_generator():
    values = [None, 2.5, None]
    first = rewards.fill_unparsed(values, np.random.default_rng([42, 7, 0]))
    assert first == rewards.fill_unparsed(values, np.random.default_rng([42, 7, 0]))  # a resumed step draws the same
    assert first[1] == 2.5 and all(v in (1.0, 2.0, 3.0, 4.0, 5.0) for v in (first[0], first[2]))
