"""A tiny LLaMA-style sentencepiece tokenizer, trained in-process, for tiny checkpoints in tests.

It is trained with the settings of Meta's LLaMA tokenizer (BPE, byte fallback, dummy prefix, no
whitespace collapsing, identity normalizer, split digits, whitespace-only pieces allowed, `<unk>`=0 `<s>`=1
`</s>`=2, no pad piece), so prompts chunk exactly as with the real one: "\\n" is a byte-fallback piece and the
text after the image slot starts with a lone "▁". The prompt words, the level words (the five names and
"one".."twelve") and any `extra_words` are single pieces. Vocabulary: a few hundred pieces; training takes
a few tens of milliseconds.
"""

from __future__ import annotations

import io
import json
import string
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

LEVEL_WORDS = ("bad", "poor", "fair", "good", "excellent")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
PROMPT = "USER: How would you rate the quality of this image? ASSISTANT: The quality of the image is {}."
PROMPT_WORDS = (
    "USER",
    "How",
    "would",
    "you",
    "rate",
    "the",
    "quality",
    "of",
    "this",
    "image",
    "ASSISTANT",
    "The",
    "is",
)

_SPECIAL = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def build_tiny_tokenizer(out_dir: str | Path, extra_words: Iterable[str] = ()) -> Path:
    """Trains the tiny tokenizer and writes `tokenizer.model`, `tokenizer_config.json` and
    `special_tokens_map.json` (the released files' keys) into `out_dir`; returns `out_dir`.

    `extra_words` (e.g. custom level names) are made single pieces too; words must not contain spaces.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = tuple(extra_words)
    for word in extra:
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"extra word {word!r} must be non-empty and without whitespace")
    words = (*LEVEL_WORDS, *NUMBER_WORDS, *extra)
    # Repetition makes every merge of these words more frequent than anything else in the corpus.
    sentences = [PROMPT.format(word) for word in words for _ in range(20)]
    sentences += [" ".join((*PROMPT_WORDS, *words))] * 20
    # Every printable ASCII character once, so ordinary text needs few byte-fallback pieces. No newline:
    # like LLaMA, "\n" must come out as the byte piece <0x0A>.
    sentences.append(string.printable.strip())
    # 256 byte pieces + 3 specials + the characters + at most len(word) merges per "▁word".
    chars = set("".join(sentences))
    vocab_size = 259 + len(chars) + sum(len(word) for word in {*PROMPT_WORDS, *words, "USER:"})
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    proto = model.getvalue()
    processor = spm.SentencePieceProcessor(model_proto=proto)
    for word in (*PROMPT_WORDS, *words):
        pieces = processor.encode(word, out_type=str)
        if pieces != ["▁" + word]:
            raise RuntimeError(f"tiny tokenizer splits {word!r} into {pieces}; raise its vocabulary size")

    (out_dir / "tokenizer.model").write_bytes(proto)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": "<s>", **_SPECIAL},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", "content": "</s>", **_SPECIAL},
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": {"__type": "AddedToken", "content": "<unk>", **_SPECIAL},
    }
    special_map = {
        "bos_token": {"content": "<s>", **_SPECIAL},
        "eos_token": {"content": "</s>", **_SPECIAL},
        "pad_token": "<unk>",
        "unk_token": {"content": "<unk>", **_SPECIAL},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return out_dir
