"""The tokenizer gives the released checkpoints' ids: prompts, level words, added tokens, training labels.

Expected ids marked "measured" were produced by the reference stack: transformers 4.36.1, slow
`LlamaTokenizer` (`AutoTokenizer.from_pretrained(dir, use_fast=False)`) on the released tokenizer files, run
through DeQA-Score's `tokenizer_image_token` / `preprocess_v1`. The released `tokenizer_config.json` sets
`"legacy": false`; the `legacy=True` columns come from the same tokenizer loaded with `legacy=True`.
"""

import json
import pickle
import random
import time

import pytest

from iqa_cli.constants import QUESTIONS, RESPONSE_TEMPLATE
from iqa_cli.errors import UserError
from iqa_cli.labels import NUMBER_NAMES as NUMBER_WORDS
from iqa_cli.labels import QUALITY_NAMES as LEVEL_WORDS
from iqa_cli.models.mplug_owl2.tiny import PROMPT_WORDS, build_tiny_tokenizer
from iqa_cli.models.mplug_owl2.tokenizer import (
    DEFAULT_PROMPT,
    EVAL_TEMPLATE,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    QUICKSTART_PROMPT,
    TRAIN_TEMPLATE,
    LlamaTokenizer,
    build_training_ids,
    level_token_ids,
    tokenize_prompt,
)

SCORE_TOKENS = ["<score1>", "<score2>", "<score3>", "<score4>", "<score5>"]

# From tests/fixtures/README.md (measured with the reference).
DEFAULT_PROMPT_IDS = [1, 3148, 1001, 29901, 1128, 723, 366, 6554, 278, 11029, 310, 445, 1967, 29973, 13, -200]
DEFAULT_PROMPT_IDS += [29871, 319, 1799, 9047, 13566, 29901, 450, 11029, 310, 278, 1967, 338]
QUICKSTART_PROMPT_IDS = [1, 3148, 1001, 29901, 1128, 723, 366, 6554, 278, 11029, 310, 445, 1967, 29973, 13, -200]
QUICKSTART_PROMPT_IDS += [29871, 13, 22933, 9047, 13566, 29901, 450, 11029, 310, 278, 1967, 338]
LEVEL_IDS = {"excellent": 15129, "good": 1781, "fair": 6534, "poor": 6460, "bad": 4319}

# Measured: text -> (ids with legacy=False, ids with legacy=True), BOS included, `<score1..5>` added as
# special tokens (Q-Scorer's `add_tokens(..., special_tokens=True)`).
MEASURED = {
    "The quality of the image is <score3>.": (
        [1, 450, 11029, 310, 278, 1967, 338, 29871, 32002, 29889],
        [1, 450, 11029, 310, 278, 1967, 338, 29871, 32002, 869],
    ),
    "is<score3>.": ([1, 338, 32002, 29889], [1, 338, 32002, 869]),
    "is <score3> .": ([1, 338, 29871, 32002, 869], [1, 338, 29871, 32002, 29871, 869]),
    "is  <score3>  good": ([1, 338, 259, 32002, 29871, 1781], [1, 338, 259, 32002, 259, 1781]),
    "<score3>": ([1, 32002], [1, 32002]),
    " <score3>": ([1, 259, 32002], [1, 259, 32002]),
    "<score3> good": ([1, 32002, 1781], [1, 32002, 29871, 1781]),
    "<score1><score2>": ([1, 32000, 32001], [1, 32000, 32001]),
    "a</s>b": ([1, 263, 2, 29890], [1, 263, 2, 289]),
    "a </s> b": ([1, 263, 29871, 2, 289], [1, 263, 29871, 2, 29871, 289]),
    "good.</s>": ([1, 1781, 29889, 2], [1, 1781, 29889, 2]),
    "x <s> y": ([1, 921, 29871, 1, 343], [1, 921, 29871, 1, 29871, 343]),
    "hello\n<score2>\nbye": ([1, 22172, 13, 32001, 13, 26966], [1, 22172, 13, 32001, 29871, 13, 26966]),
    "▁hello ▁ x": ([1, 29871, 22172, 259, 921], [1, 29871, 22172, 259, 921]),
    "  two leading": ([1, 259, 1023, 8236], [1, 259, 1023, 8236]),
    "trailing  ": ([1, 25053, 259], [1, 25053, 259]),
    "a<unk>b": ([1, 263, 0, 29890], [1, 263, 0, 289]),
    "\n": ([1, 29871, 13], [1, 29871, 13]),
    " ": ([1, 259], [1, 259]),
    "": ([1], [1]),
}
# Measured with `add_tokens(...)` (not special): a text starting with the token keeps the "▁" piece.
MEASURED_NOT_SPECIAL = {"<score3>": [1, 29871, 32002], "<score3> good": [1, 29871, 32002, 1781]}


@pytest.fixture
def real(tokenizer_fixture) -> LlamaTokenizer:
    return LlamaTokenizer.from_dir(tokenizer_fixture)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture
def tiny(tiny_dir) -> LlamaTokenizer:
    return LlamaTokenizer.from_dir(tiny_dir)


def _with_legacy(tokenizer: LlamaTokenizer, legacy: bool) -> LlamaTokenizer:
    copy = pickle.loads(pickle.dumps(tokenizer))
    copy.legacy = legacy
    return copy


# ---------------------------------------------------------------------- released tokenizer


def test_released_prompts_give_the_reference_ids(real):
    assert not real.legacy  # the released tokenizer_config.json says "legacy": false
    assert tokenize_prompt(real, DEFAULT_PROMPT) == DEFAULT_PROMPT_IDS
    assert tokenize_prompt(real, QUICKSTART_PROMPT) == QUICKSTART_PROMPT_IDS
    words = list(LEVEL_IDS)
    assert level_token_ids(real, words) == [LEVEL_IDS[w] for w in words]
    assert (real.bos_id, real.eos_id, real.unk_id, real.pad_id, len(real)) == (1, 2, 0, 0, 32000)


@pytest.mark.parametrize("legacy", [False, True])
def test_added_special_tokens_match_the_reference(real, legacy):
    tokenizer = _with_legacy(real, legacy)
    assert tokenizer.add_tokens(SCORE_TOKENS) == [32000, 32001, 32002, 32003, 32004]
    assert len(tokenizer) == 32005
    for text, expected in MEASURED.items():
        assert tokenizer.encode(text, add_bos=True) == expected[legacy], text


def test_added_plain_tokens_match_the_reference(real):
    real.add_tokens(SCORE_TOKENS, special=False)
    for text, expected in MEASURED_NOT_SPECIAL.items():
        assert real.encode(text, add_bos=True) == expected


def test_prompt_starting_with_the_image_keeps_the_reference_bos(real):
    # Measured: `tokenizer_image_token("<|image|>\nHi")` keeps BOS after the slot (its first part is empty).
    assert tokenize_prompt(real, "<|image|>\nHi") == [-200, 1, 29871, 13, 18567]
    assert tokenize_prompt(real, "Hi<|image|>") == [1, 6324, -200]


def test_legacy_mode_equals_transformers_sentencepiece_tokenizer(real, tokenizer_fixture):
    """transformers 5.x has no slow LlamaTokenizer any more (its LlamaTokenizer is the `tokenizers` one, which
    drops the 29871 after the image slot). Its generic `SentencePieceBackend` with `legacy=True` is what 4.36's
    slow LlamaTokenizer did in legacy mode; with `legacy=False` it lacks Llama's "▁" prefix rule, added here."""
    backend_module = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    vocab = str(tokenizer_fixture / "tokenizer.model")
    rng = random.Random(0)
    atoms = [
        "hello",
        "The",
        "quality",
        " ",
        "  ",
        "\n",
        ".",
        "?",
        "▁",
        "é",
        "日本",
        "😀",
        "123",
        "<s>",
        "</s>",
        "<score2>",
    ]
    texts = ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 7))) for _ in range(300)]
    for legacy in (True, False):
        ours = _with_legacy(real, legacy)
        ours.add_tokens(SCORE_TOKENS)
        theirs = backend_module.SentencePieceBackend(
            vocab_file=vocab, legacy=legacy, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        )
        theirs.add_tokens(SCORE_TOKENS, special_tokens=True)
        for text in texts:
            if legacy:
                expected = theirs.convert_tokens_to_ids(theirs.tokenize(text))
            else:
                tokens = theirs.tokenize("▁" + text.replace("▁", " "))
                if len(tokens) > 1 and tokens[0] == "▁" and tokens[1] in theirs.all_special_tokens:
                    tokens = tokens[1:]
                expected = theirs.convert_tokens_to_ids(tokens)
            assert ours.encode(text) == expected, (legacy, text)


def test_level_words_sharing_a_first_token_are_refused(real):
    with pytest.raises(UserError, match=r"'poor' and 'poorly' both start with token '▁poor' \(id 6460\)"):
        level_token_ids(real, ["bad", "poor", "poorly"])


def test_training_ids_and_labels_match_the_reference(real):
    question, response = "How would you rate the quality of this image?", "The quality of the image is good."
    ids, labels = build_training_ids(real, question, response)
    # Measured (preprocess_multimodal moved the image first; the conversation is
    # "USER: <|image|>\nHow would ...? ASSISTANT: The quality of the image is good.</s>").
    expected = [1, 3148, 1001, 29901, 29871, -200, 29871, 13, 5328, 723, 366, 6554, 278, 11029, 310, 445, 1967]
    expected += [29973, 319, 1799, 9047, 13566, 29901, 450, 11029, 310, 278, 1967, 338, 1781, 29889, 2]
    assert ids == expected
    # By hand from preprocess_v1: labels[:2] masked, then len(tii("USER: <|image|>\nQ ASSISTANT: ")) - 3 more.
    # That instruction tokenizes to the 23 ids before "▁The" plus a lone "▁" for its trailing space: 24 ids,
    # so 2 + 21 = 23 positions are masked and the targets are "▁The ... ▁good . </s>".
    instruction = tokenize_prompt(real, f"USER: <|image|>\n{question} ASSISTANT: ")
    assert instruction == [*expected[:23], 29871]
    assert labels == [IGNORE_INDEX] * 23 + expected[23:]
    # Measured: "<unk>" counts as padding, the lengths disagree and the reference masks everything.
    assert set(build_training_ids(real, question, "The quality of the image is <unk>.")[1]) == {IGNORE_INDEX}


# ---------------------------------------------------------------------- tiny tokenizer (no fixture needed)


def test_tiny_tokenizer_chunks_prompts_like_the_real_one(tiny_dir):
    start = time.perf_counter()
    build_tiny_tokenizer(tiny_dir.parent / "again")
    assert time.perf_counter() - start < 2.0
    tok = LlamaTokenizer.from_dir(tiny_dir)
    assert len(tok) < 1000 and not tok.legacy
    for word in (*PROMPT_WORDS, *LEVEL_WORDS, *NUMBER_WORDS):
        assert [tok.id_to_token(i) for i in tok.encode(word)] == ["▁" + word]
    ids = tokenize_prompt(tok, DEFAULT_PROMPT)
    pieces = [tok.id_to_token(i) if i >= 0 else i for i in ids]
    assert pieces[0] == "<s>" and ids.count(tok.bos_id) == 1 and ids.count(IMAGE_TOKEN_INDEX) == 1
    slot = ids.index(IMAGE_TOKEN_INDEX)
    assert pieces[slot - 2 : slot + 3] == ["?", "<0x0A>", IMAGE_TOKEN_INDEX, "▁", "▁ASSISTANT"]
    assert pieces[-1] == "▁is"
    quick = [tok.id_to_token(i) if i >= 0 else i for i in tokenize_prompt(tok, QUICKSTART_PROMPT)]
    assert quick[slot : slot + 3] == [IMAGE_TOKEN_INDEX, "▁", "<0x0A>"]
    assert len(set(level_token_ids(tok, NUMBER_WORDS))) == 12


def test_tiny_tokenizer_extra_words_are_single_pieces(tmp_path):
    tok = LlamaTokenizer.from_dir(build_tiny_tokenizer(tmp_path, extra_words=["superb", "awful"]))
    assert [tok.id_to_token(i) for i in tok.encode("superb awful")] == ["▁superb", "▁awful"]


@pytest.mark.parametrize("template", [TRAIN_TEMPLATE, EVAL_TEMPLATE], ids=["train", "eval"])
def test_training_labels_are_the_response_and_eos(tiny, template):
    for question in QUESTIONS:
        response = RESPONSE_TEMPLATE.format("fair")
        ids, labels = build_training_ids(tiny, question, response, template)
        assert ids == tokenize_prompt(tiny, template.conversation(question, response))
        assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids[-1] == tiny.eos_id
        targets = [*tiny.encode(response), tiny.eos_id]  # the response tokenized on its own, then </s>
        assert labels[-len(targets) :] == targets
        assert labels[: -len(targets)] == [IGNORE_INDEX] * (len(ids) - len(targets))


def test_templates_render_the_reference_strings():
    question = QUESTIONS[0]
    assert TRAIN_TEMPLATE.conversation(question, "The quality of the image is good.") == (
        f"USER: <|image|>\n{question} ASSISTANT: The quality of the image is good.</s>"
    )
    assert EVAL_TEMPLATE.prompt("How would you rate the quality of this image?") == DEFAULT_PROMPT
    assert len(set(QUESTIONS)) == 10


def test_added_tokens_split_out_and_survive_save_and_load(tiny, tmp_path):
    assert tiny.add_tokens(SCORE_TOKENS) == list(range(len(tiny) - 5, len(tiny)))
    first = tiny.token_to_id("<score1>")
    assert tiny.add_tokens(["<score3>"]) == [first + 2]  # known token: same id, nothing added
    text = "The quality of the image is <score4>."
    ids = tiny.encode(text)
    assert ids.count(first + 3) == 1 and tiny.decode(ids) == text
    tiny.save(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["added_tokens_decoder"][str(first)]["content"] == "<score1>"
    assert json.loads((tmp_path / "added_tokens.json").read_text())["<score5>"] == first + 4

    again = LlamaTokenizer.from_dir(tmp_path)
    assert again.added_tokens == tiny.added_tokens and len(again) == len(tiny)
    assert again.encode(text, add_bos=True) == tiny.encode(text, add_bos=True)
    assert again.encode("<score2> good") == tiny.encode("<score2> good")  # still special: no leading "▁"

    # Either file alone is enough.
    (tmp_path / "added_tokens.json").unlink()
    assert LlamaTokenizer.from_dir(tmp_path).added_tokens == tiny.added_tokens
    tiny.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    only_json = LlamaTokenizer.from_dir(tmp_path)
    assert only_json.added_tokens == tiny.added_tokens
    assert only_json.encode("<score2> good") == tiny.encode("<score2> good")


def test_saved_added_tokens_are_read_by_transformers(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    ids = tiny.add_tokens(SCORE_TOKENS)
    tiny.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.convert_tokens_to_ids(SCORE_TOKENS) == ids
    assert len(theirs) == len(tiny)
    assert ids[2] in theirs("The quality of the image is <score3>.").input_ids


def test_pickled_tokenizer_encodes_the_same(tiny):
    tiny.add_tokens(SCORE_TOKENS)
    clone = pickle.loads(pickle.dumps(tiny))
    text = "USER: Rate it <score2>\n twice"
    assert clone.encode(text) == tiny.encode(text) and len(clone) == len(tiny)


def test_collision_and_prompt_errors(tiny):
    with pytest.raises(UserError, match="'good' and 'goodish' both start with token '▁good'"):
        level_token_ids(tiny, ["good", "goodish"])
    with pytest.raises(UserError, match="gives no token"):
        level_token_ids(tiny, ["good", ""])
    with pytest.raises(UserError, match="exactly once, found 0"):
        tokenize_prompt(tiny, "USER: no image here")
    with pytest.raises(UserError, match="exactly once, found 2"):
        tokenize_prompt(tiny, "<|image|><|image|>")
    with pytest.raises(UserError, match="not in the tokenizer's vocabulary"):
        tiny.token_to_id("<score9>")


def test_bad_tokenizer_directories(tmp_path, tiny_dir):
    with pytest.raises(UserError, match=r"no tokenizer\.model in"):
        LlamaTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        LlamaTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes((tiny_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(UserError, match=r"tokenizer_config\.json is not valid JSON"):
        LlamaTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<gap>": 5000}))
    with pytest.raises(UserError, match="'<gap>' has id 5000"):
        LlamaTokenizer.from_dir(tmp_path)


def test_missing_legacy_key_means_legacy_as_in_transformers_4(tiny_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((tiny_dir / "tokenizer.model").read_bytes())
    assert LlamaTokenizer.from_dir(tmp_path).legacy
