"""A tiny random-init mPLUG-Owl2 in the released full layout (config.json, model.safetensors, the sentencepiece
tokenizer files, preprocessor_config.json), with a tokenizer trained in-process with LLaMA's settings, so
nothing is downloaded: what `iqa demo` trains and the tests and benchmarks load."""

from __future__ import annotations

import io
import json
import math
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from iqa_cli.labels import NUMBER_NAMES, QUALITY_NAMES

# --- tokenizer --------------------------------------------------------------------------------------------------

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
    """Trains a tiny LLaMA-style sentencepiece tokenizer and writes `tokenizer.model`, `tokenizer_config.json`
    and `special_tokens_map.json` (the released files' keys) into `out_dir`; returns `out_dir`.

    Trained with the settings of Meta's LLaMA tokenizer (BPE, byte fallback, dummy prefix, no whitespace
    collapsing, identity normalizer, split digits, whitespace-only pieces allowed, `<unk>`=0 `<s>`=1 `</s>`=2,
    no pad piece), so prompts chunk exactly as with the real one: "\\n" is a byte-fallback piece and the text
    after the image slot starts with a lone "▁". The prompt words, the level words (the five names and
    "one".."twelve") and any `extra_words` (e.g. custom level names, without spaces) are single pieces.
    A few hundred pieces; training takes a few tens of milliseconds.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = tuple(extra_words)
    for word in extra:
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"extra word {word!r} must be non-empty and without whitespace")
    words = (*QUALITY_NAMES, *NUMBER_NAMES, *extra)
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


# --- model ------------------------------------------------------------------------------------------------------


def tiny_config(image_size: int = 28, **overrides: Any):
    """The tiny size ("mplug-owl2-tiny": ViT 32 wide, 6 queries, LLM 64 wide, vocab 512) at `image_size` px
    (a multiple of 14: the ViT sees (image_size / 14)^2 patches)."""
    from iqa_cli.models.mplug_owl2.config import MPLUGOwl2Config

    if image_size % 14:
        raise ValueError(f"image_size must be a multiple of 14, got {image_size}")
    vision = {"image_size": image_size, **overrides.pop("vision", {})}
    abstractor = {"grid_size": image_size // 14, **overrides.pop("abstractor", {})}
    return MPLUGOwl2Config.from_name("mplug-owl2-tiny", vision=vision, abstractor=abstractor, **overrides)


def tiny_model(seed: int = 0, config=None, **overrides: Any):
    """A tiny model in eval mode whose every weight is random, so the two multiway copies, the norms' gains
    and biases and all learned embeddings differ and matter."""
    import torch

    from iqa_cli.models.mplug_owl2.model import MPLUGOwl2ForCausalLM

    config = config if config is not None else tiny_config(**overrides)
    torch.manual_seed(seed)
    model = MPLUGOwl2ForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim == 1 and leaf == "weight":  # norm gains
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * noise)
            elif p.ndim == 3:  # cls token, position embeddings, query embeddings, vit_eos
                p.copy_(0.5 * noise)
            else:  # linear / conv / embedding weights
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model.eval()


def released_preprocessor_config(side: int) -> dict[str, Any]:
    """`preprocessor_config.json` as the released checkpoints ship it (CLIP's, at 448), at `side` px."""
    return {
        "crop_size": side,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": side,
    }


def write_tiny_checkpoint(
    directory: str | Path, *, image_size: int = 28, seed: int = 0, extra_words: Iterable[str] = (), **overrides: Any
) -> Path:
    """A random-init tiny mPLUG-Owl2 written as a full released-layout checkpoint directory; returns it."""
    from iqa_cli.models.mplug_owl2.checkpoints import save_mplug_owl2

    directory = Path(directory)
    save_mplug_owl2(tiny_model(seed=seed, config=tiny_config(image_size, **overrides)), directory)
    build_tiny_tokenizer(directory, extra_words=extra_words)
    text = json.dumps(released_preprocessor_config(image_size), indent=2) + "\n"
    (directory / "preprocessor_config.json").write_text(text, encoding="utf-8")
    return directory
