"""Tiny random checkpoints of each supported transformers family, in the real on-disk format, for the tests and
the benchmarks (nothing is downloaded).

Each is a directory that `AutoModelForImageTextToText` / `AutoProcessor.from_pretrained` load: a few-layer random
model with the family's config class, a byte-level BPE tokenizer trained here on the prompt's words (so the level
words are single tokens) with the family's special tokens, the family's image processor and a chat template of
the family's shape.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from iqa_cli.constants import DEFAULT_QUESTION, QUESTIONS, RESPONSE_TEMPLATE

TINY_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "idefics3")
HIDDEN = 32  # the language model's width in every tiny config
LEVEL_WORDS = ("bad", "poor", "fair", "good", "excellent", "one", "two", "three", "four", "five")

_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message.role != 'system' and system_default -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string -%}{{ message.content }}{%- else -%}"
    "{%- for c in message.content -%}"
    "{%- if c.type == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c.type == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif c.type == 'text' -%}{{ c.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
_LLAVA_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
_LLAVA_TEMPLATE = (
    "{%- for message in messages -%}{{ '<|im_start|>' + message.role + ' ' }}"
    "{%- for c in message.content | selectattr('type', 'equalto', 'image') -%}{{ '<image>' }}{%- endfor -%}"
    "{%- for c in message.content | selectattr('type', 'equalto', 'text') -%}{{ '\\n' + c.text }}{%- endfor -%}"
    "{{ '<|im_end|>' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
_IDEFICS_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)
_IDEFICS_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{%- for message in messages -%}{{ message.role | capitalize }}"
    "{%- if message.content[0].type == 'image' -%}{{ ':' }}{%- else -%}{{ ': ' }}{%- endif -%}"
    "{%- for c in message.content -%}{%- if c.type == 'text' -%}{{ c.text }}"
    "{%- elif c.type == 'image' -%}{{ '<image>' }}{%- endif -%}{%- endfor -%}{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def build_tokenizer(specials: tuple[str, ...], chat_template: str, *, vocab_size: int = 400, **named: str) -> Any:
    """A byte-level BPE trained on the prompts' words; `specials` are added as special tokens (ids from 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [*QUESTIONS, DEFAULT_QUESTION, "You are a helpful assistant.", "user assistant system User Assistant"]
    corpus += [RESPONSE_TEMPLATE.format(word) for word in LEVEL_WORDS] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    fast.chat_template = chat_template
    return fast


def _tiny_text(vocab_size: int, pad_token_id: int, **extra: Any) -> dict[str, Any]:
    """The language model of every tiny config: 2 layers, HIDDEN wide, 4 query and 2 key/value heads."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": pad_token_id,
        **extra,
    }


def _qwen(model_type: str, tokenizer: Any = None) -> tuple[Any, Any]:
    from transformers import AutoConfig, Qwen2VLImageProcessor

    template = _QWEN_TEMPLATE.replace("system_default", "true" if model_type != "qwen3_vl" else "false")
    if tokenizer is None:
        tokenizer = build_tokenizer(_QWEN_SPECIALS, template, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = template
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    patch = 16 if model_type == "qwen3_vl" else 14
    text = _tiny_text(
        len(tokenizer),
        ids["<|endoftext|>"],
        max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    vision: dict[str, Any] = {
        "depth": 2,
        "num_heads": 2,
        "patch_size": patch,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if model_type == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
        vision |= {"embed_dim": 16, "hidden_size": HIDDEN, "mlp_ratio": 2}
    elif model_type == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}
        vision |= {
            "hidden_size": 16,
            "intermediate_size": 32,
            "out_hidden_size": HIDDEN,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    else:
        text |= {"head_dim": 8}
        text["rope_parameters"] = {
            "rope_type": "default",
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
            "rope_theta": 10000.0,
        }
        vision |= {
            "hidden_size": 16,
            "intermediate_size": 32,
            "out_hidden_size": HIDDEN,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        }
    config = AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=4 * patch * patch, max_pixels=64 * 64
    )
    return config, _processor(model_type, image_processor, tokenizer, template)


def _processor(model_type: str, image_processor: Any, tokenizer: Any, template: str, **extra: Any) -> Any:
    import transformers

    name = {
        "qwen2_vl": "Qwen2VLProcessor",
        "qwen2_5_vl": "Qwen2_5_VLProcessor",
        "qwen3_vl": "Qwen3VLProcessor",
        "llava_onevision": "LlavaOnevisionProcessor",
        "idefics3": "Idefics3Processor",
    }[model_type]
    cls = getattr(transformers, name)
    kwargs: dict[str, Any] = {"image_processor": image_processor, "tokenizer": tokenizer, "chat_template": template}
    video = {
        "qwen2_vl": "Qwen2VLVideoProcessor",
        "qwen2_5_vl": "Qwen2VLVideoProcessor",
        "qwen3_vl": "Qwen3VLVideoProcessor",
        "llava_onevision": "LlavaOnevisionVideoProcessor",
    }
    if model_type in video:  # the processors insist on one; its frames the size of the images
        sizes = {k: v for k, v in dict(image_processor.size).items() if v is not None}
        kwargs["video_processor"] = getattr(transformers, video[model_type])(size=sizes)
    return cls(**kwargs, **extra)


def tiny_checkpoint(model_type: str, out: str | Path, *, seed: int = 0) -> Path:
    """Builds, seeds and saves a tiny random checkpoint of `model_type` (one of TINY_FAMILIES) into `out`."""
    import torch
    from transformers import AutoModelForImageTextToText

    builders = {"llava_onevision": _llava_onevision, "idefics3": _idefics3}
    config, processor = builders.get(model_type, lambda: _qwen(model_type))()
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():  # some families initialize parts to zero: random everywhere, so every path matters
        for p in model.parameters():
            p.normal_(0, 0.2)
    out = Path(out)
    from iqa_cli.models.hf_vlm.checkpoints import _quiet_transformers

    with _quiet_transformers():
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return out


def _llava_onevision() -> tuple[Any, Any]:
    from transformers import AutoConfig, LlavaOnevisionImageProcessor

    tokenizer = build_tokenizer(_LLAVA_SPECIALS, _LLAVA_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _LLAVA_SPECIALS}
    side = 28
    config = AutoConfig.for_model(
        "llava_onevision",
        text_config=_tiny_text(len(tokenizer), ids["<|endoftext|>"], model_type="qwen2"),
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": side,
            "patch_size": 14,
        },
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=[[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": side, "width": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    processor = _processor(
        "llava_onevision",
        image_processor,
        tokenizer,
        _LLAVA_TEMPLATE,
        num_image_tokens=(side // 14) ** 2,
        vision_feature_select_strategy="full",
    )
    return config, processor


def _idefics3() -> tuple[Any, Any]:
    from transformers import AutoConfig, Idefics3ImageProcessor

    tokenizer = build_tokenizer(
        _IDEFICS_SPECIALS,
        _IDEFICS_TEMPLATE,
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        pad_token="<|end_of_text|>",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _IDEFICS_SPECIALS}
    side, patch, scale = 32, 8, 2
    config = AutoConfig.for_model(
        "idefics3",
        text_config=_tiny_text(len(tokenizer), ids["<|end_of_text|>"], model_type="llama"),
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": side,
            "patch_size": patch,
        },
        image_token_id=ids["<image>"],
        scale_factor=scale,
        pad_token_id=ids["<|end_of_text|>"],
    )
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side})
    seq_len = (side // patch) ** 2 // scale**2
    processor = _processor("idefics3", image_processor, tokenizer, _IDEFICS_TEMPLATE, image_seq_len=seq_len)
    return config, processor


# --- reasoning models ------------------------------------------------------------------------------------------

# The whole vocabulary of the tiny reasoning model besides the Qwen-VL specials: the answer tags, the digits and a
# few words, so that a random policy writes numbers often and GRPO can find the format within a few steps. Every
# other word of a prompt is the unknown token.
REASONING_WORDS = ("<think>", "</think>", "<answer>", "</answer>", "1", "2", "3", "4", "5", ".", "good", "bad")
UNKNOWN = "[UNK]"


def reasoning_tokenizer() -> Any:
    """A word-level tokenizer over `REASONING_WORDS` (digits one token each, the tags whole) with Qwen-VL's
    special tokens; it decodes with spaces between tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tags = [w for w in REASONING_WORDS if w.startswith("<")]
    plain = [w for w in REASONING_WORDS if w not in tags]
    vocab = {token: i for i, token in enumerate([*_QWEN_SPECIALS, UNKNOWN, *plain])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNKNOWN, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def tiny_reasoning_checkpoint(
    out: str | Path, *, seed: int = 0, answer: str | None = None, digit_logits: tuple[float, ...] = ()
) -> Path:
    """A tiny random Qwen2-VL with `reasoning_tokenizer`'s small vocabulary.

    With `answer` (a digit), its greedy answer to any prompt is `<think> good </think> <answer> {answer} </answer>`:
    each token's embedding is a large one-hot vector and the LM head maps it to the next token of that chain (a
    bigram model), while the random layers still add a small, image-dependent part, so the five digit logits after
    `<answer>` are `digit_logits` moved a little by the image (the digit-probability readout has something to read).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from iqa_cli.models.hf_vlm.checkpoints import _quiet_transformers

    tokenizer = reasoning_tokenizer()
    config, processor = _qwen("qwen2_vl", tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        if answer is not None:
            _answer_chain(model, tokenizer, answer, digit_logits or (0.0, 1.0, 2.0, 1.5, -1.0))
    out = Path(out)
    with _quiet_transformers():
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return out


def _answer_chain(model: Any, tokenizer: Any, answer: str, digit_logits: tuple[float, ...]) -> None:
    """Embeddings 30 e_v (one-hot, the vocabulary fits the width) and an LM head whose row u reads 4 at e_v when u
    follows v in the chain: after the final norm (sqrt(width) e_v, plus the layers' small part) the next token's
    logit leads by about 20. After `<answer>` the digits get `digit_logits` instead (the answer's digit leads)."""
    import torch

    ids = tokenizer.convert_tokens_to_ids
    vocab = len(tokenizer)
    width = model.get_input_embeddings().weight.shape[1]
    if vocab > width:
        raise ValueError(f"a vocabulary of {vocab} does not fit the width {width}")
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    embed.zero_()
    embed[:, :vocab] = 30.0 * torch.eye(vocab)
    model.model.language_model.norm.weight.fill_(1.0)
    head.zero_()
    chain = [UNKNOWN, "<think>", "good", "</think>", "<answer>", answer, "</answer>", "<|im_end|>"]
    for current, following in itertools.pairwise(chain):
        head[ids(following), ids(current)] = 4.0
    at = ids("<answer>")
    head[ids(answer), at] = 0.0
    for digit, logit in zip("12345", digit_logits, strict=True):
        head[ids(digit), at] = 4.0 + logit / 5.6  # sqrt(32) ~ 5.6: the digit's logit is about 22 + `logit`
