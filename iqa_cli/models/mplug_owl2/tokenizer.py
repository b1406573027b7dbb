"""LLaMA tokenizer on sentencepiece, with the exact ids the released mPLUG-Owl2 checkpoints were trained on.

The reference (DeQA-Score, Q-Align, Q-Scorer) tokenizes with transformers 4.36's slow `LlamaTokenizer`. The
released `tokenizer_config.json` says `"legacy": false`, and that mode does three things plain sentencepiece
does not: it prepends "▁" to the whole text (after turning any literal "▁" into a space), splits out added
tokens (`<s>`, `</s>`, `<unk>`, `<score1>`...) as whole tokens, and encodes the text right after an added token
without sentencepiece's dummy-prefix space ("<score3>." gives `.` 29889, not `▁.` 869). A text that starts
with a special token loses the leading "▁" piece. This module reimplements exactly that on top of
`sentencepiece`, so the ids do not move when transformers changes its Llama tokenizer (transformers 5.x
drops the lone "▁" 29871 that starts the text after the image slot, which the released models rely on).
With `"legacy": true` (or no `legacy` key, as in 4.36) every chunk between added tokens is encoded with the
dummy prefix instead.

`<|image|>` is not a token: `tokenize_prompt` splits the prompt on it, tokenizes the parts separately (the
reference's `tokenizer_image_token`, DeQA-Score `src/mm_utils.py`) and puts `IMAGE_TOKEN_INDEX` in the slot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from iqa_cli.constants import DEFAULT_QUESTION, IGNORE_INDEX, RESPONSE_PREFIX
from iqa_cli.errors import UserError
from iqa_cli.files import read_json_object

IMAGE_TOKEN = "<|image|>"
IMAGE_TOKEN_INDEX = -200
SPIECE_UNDERLINE = "▁"


TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"

# NormalizerSpec{add_dummy_prefix: false} as ModelProto field 3. Protobuf merges a repeated embedded message
# field into the earlier one, so appending these bytes to a serialized model switches the dummy prefix off
# (what transformers does through the protobuf classes for `legacy=False`).
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


@dataclass(frozen=True)
class AddedToken:
    """A token matched as a whole in text before sentencepiece runs (transformers' `AddedToken`).

    `lstrip`/`rstrip` eat the whitespace on that side of the token and `single_word` leaves it inside a word
    as plain text, as in transformers' slow tokenizers; `normalized` is only kept so that saving preserves it.
    """

    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False

    def to_json(self) -> dict:
        return {
            "content": self.content,
            "lstrip": self.lstrip,
            "normalized": self.normalized,
            "rstrip": self.rstrip,
            "single_word": self.single_word,
            "special": self.special,
        }


class LlamaTokenizer:
    """LLaMA sentencepiece tokenizer with the reference's (transformers 4.36 slow) encoding rules."""

    def __init__(
        self,
        model_proto: bytes,
        *,
        legacy: bool = False,
        pad_token: str | None = None,
        added_tokens: Iterable[tuple[int, AddedToken]] = (),
        config: dict | None = None,
    ):
        """Builds the tokenizer.

        Args:
            model_proto: bytes of a sentencepiece `tokenizer.model`.
            legacy: transformers' `legacy` flag; False reproduces the released checkpoints' tokenizer.
            pad_token: token used for padding; None means `<unk>`, as the reference training sets it.
            added_tokens: (id, token) pairs beyond the sentencepiece vocabulary, ids contiguous from its size.
            config: the `tokenizer_config.json` it was read from, kept so that `save` writes it back.
        """
        self.model_proto = bytes(model_proto)
        self.legacy = bool(legacy)
        self._config = dict(config or {})
        self._sp = _load_sp(self.model_proto)
        # Non-legacy mode encodes with the dummy prefix switched off (and adds the "▁" itself).
        self._sp_plain = _load_sp(self.model_proto + _NO_DUMMY_PREFIX)
        self.vocab_size = self._sp.get_piece_size()  # sentencepiece vocabulary, without added tokens
        self.unk_id = self._sp.unk_id()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        if min(self.unk_id, self.bos_id, self.eos_id) < 0:
            raise UserError("tokenizer.model has no <unk>, <s> or </s> piece; not a LLaMA sentencepiece model")
        self.unk_token = self._sp.id_to_piece(self.unk_id)
        self.bos_token = self._sp.id_to_piece(self.bos_id)
        self.eos_token = self._sp.id_to_piece(self.eos_id)
        self._underline_id = self._sp.piece_to_id(SPIECE_UNDERLINE)
        self._unk_prefix_len = len(self._sp_plain.encode(self.unk_token))
        # Base special tokens are split out of text as whole tokens too, as transformers does.
        self._added: dict[int, AddedToken] = {
            i: AddedToken(self._sp.id_to_piece(i)) for i in (self.unk_id, self.bos_id, self.eos_id)
        }
        for token_id, token in sorted(added_tokens, key=lambda pair: pair[0]):
            self._register(token_id, token)
        self.pad_token = pad_token or self.unk_token
        self._rebuild()
        self.pad_id = self.token_to_id(self.pad_token)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_dir(cls, path: str | Path) -> LlamaTokenizer:
        """Reads `tokenizer.model` and, when present, `tokenizer_config.json` (its `legacy` flag and
        `added_tokens_decoder`), `added_tokens.json` and `special_tokens_map.json` from a checkpoint directory."""
        path = Path(path)
        model_file = path / TOKENIZER_MODEL
        if not model_file.is_file():
            raise UserError(f"no {TOKENIZER_MODEL} in {path} (a sentencepiece LLaMA tokenizer is needed)")
        config = _read_json(path / TOKENIZER_CONFIG)
        special_map = _read_json(path / SPECIAL_TOKENS_MAP)
        added_json = _read_json(path / ADDED_TOKENS)
        proto = model_file.read_bytes()
        base = _load_sp(proto)
        base_size = base.get_piece_size()
        base_specials = {base.unk_id(), base.bos_id(), base.eos_id()}

        additional = {_token_content(t) for t in config.get("additional_special_tokens") or []}
        additional |= {_token_content(t) for t in special_map.get("additional_special_tokens") or []}
        added: dict[int, AddedToken] = {}
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            token_id = _as_int(key, path / TOKENIZER_CONFIG, "added_tokens_decoder")
            if token_id in base_specials:
                continue  # <unk>, <s>, </s>: split out of text anyway
            added[token_id] = AddedToken(
                content=entry["content"],
                special=bool(entry.get("special", entry["content"] in additional)),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                normalized=bool(entry.get("normalized", False)),
                single_word=bool(entry.get("single_word", False)),
            )
        for content, raw_id in added_json.items():
            token_id = _as_int(raw_id, path / ADDED_TOKENS, content)
            if token_id in added:
                if added[token_id].content != content:
                    raise UserError(
                        f"{path / ADDED_TOKENS}: id {token_id} is {content!r} there but "
                        f"{added[token_id].content!r} in {TOKENIZER_CONFIG}"
                    )
                continue
            if token_id >= base_size:
                added[token_id] = AddedToken(content, special=content in additional, normalized=True)

        pad = _token_content(config.get("pad_token")) or _token_content(special_map.get("pad_token"))
        # transformers 4.36 defaults `legacy` to True when the key is absent.
        legacy = config.get("legacy")
        legacy = True if legacy is None else bool(legacy)
        try:
            return cls(proto, legacy=legacy, pad_token=pad, added_tokens=added.items(), config=config)
        except ValueError as err:
            raise UserError(f"{path}: {err}") from None

    def save(self, directory: str | Path) -> Path:
        """Writes `tokenizer.model`, `tokenizer_config.json` (with `added_tokens_decoder`),
        `special_tokens_map.json` and, if there are added tokens, `added_tokens.json`: files both this class
        and transformers' `AutoTokenizer` read."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_MODEL).write_bytes(self.model_proto)
        extra = [t for i, t in sorted(self._added.items()) if i >= self.vocab_size]
        specials = [t.content for t in extra if t.special]

        def special_entry(content: str) -> dict:
            return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

        config = {
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 2048,
            "padding_side": "right",
            "sp_model_kwargs": {},
            **self._config,
            "legacy": self.legacy,
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": {"__type": "AddedToken", **special_entry(self.bos_token)},
            "eos_token": {"__type": "AddedToken", **special_entry(self.eos_token)},
            "unk_token": {"__type": "AddedToken", **special_entry(self.unk_token)},
            "pad_token": None if self.pad_token == self.unk_token else self.pad_token,
            "added_tokens_decoder": {str(i): t.to_json() for i, t in sorted(self._added.items())},
        }
        config.pop("additional_special_tokens", None)
        if specials:
            config["additional_special_tokens"] = specials
        special_map = {
            "bos_token": special_entry(self.bos_token),
            "eos_token": special_entry(self.eos_token),
            "pad_token": self.pad_token,
            "unk_token": special_entry(self.unk_token),
        }
        if specials:
            special_map["additional_special_tokens"] = specials
        _write_json(directory / TOKENIZER_CONFIG, config)
        _write_json(directory / SPECIAL_TOKENS_MAP, special_map)
        added_file = directory / ADDED_TOKENS
        if extra:
            _write_json(added_file, {t.content: self.token_to_id(t.content) for t in extra})
        elif added_file.exists():
            added_file.unlink()
        return directory

    def __getstate__(self) -> dict:
        # sentencepiece processors do not pickle; rebuild them from the model bytes (DataLoader workers).
        state = self.__dict__.copy()
        for key in ("_sp", "_sp_plain", "_split_re"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._sp = _load_sp(self.model_proto)
        self._sp_plain = _load_sp(self.model_proto + _NO_DUMMY_PREFIX)
        self._rebuild()

    # ------------------------------------------------------------------ vocabulary

    def __len__(self) -> int:
        """Vocabulary size including added tokens (the embedding rows a model needs)."""
        return self.vocab_size + sum(1 for i in self._added if i >= self.vocab_size)

    @property
    def added_tokens(self) -> dict[str, int]:
        """Tokens added beyond the sentencepiece vocabulary, content -> id."""
        return {t.content: i for i, t in sorted(self._added.items()) if i >= self.vocab_size}

    def add_tokens(self, tokens: Iterable[str], *, special: bool = True) -> list[int]:
        """Appends tokens after the vocabulary (Q-Scorer's `<score1>`..`<score5>` -> 32000..32004) and returns
        the id of each; a token already known keeps its id.

        `special=True` is what Q-Scorer does (`add_tokens(..., special_tokens=True)`): a text that starts
        with the token then gets no leading "▁" piece.
        """
        ids = []
        for content in tokens:
            if not content:
                raise ValueError("cannot add an empty token")
            token_id = self._id_of_added(content)
            if token_id is None:
                piece = self._sp.piece_to_id(content)
                # A sentencepiece piece keeps its id (it is only marked as added); a new token goes at the end.
                token_id = piece if piece != self.unk_id or content == self.unk_token else len(self)
                self._register(token_id, AddedToken(content, special=special, normalized=not special))
                self._rebuild()
            ids.append(token_id)
        return ids

    def token_to_id(self, token: str) -> int:
        """The id of an added token or a sentencepiece piece (e.g. "▁good"); UserError if unknown."""
        token_id = self._id_of_added(token)
        if token_id is not None:
            return token_id
        piece = self._sp.piece_to_id(token)
        if piece == self.unk_id and token != self.unk_token:
            raise UserError(f"token {token!r} is not in the tokenizer's vocabulary")
        return piece

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._added:
            return self._added[token_id].content
        if 0 <= token_id < self.vocab_size:
            return self._sp.id_to_piece(token_id)
        raise ValueError(f"token id {token_id} is outside the vocabulary (size {len(self)})")

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` exactly as the reference's `tokenizer(text).input_ids` (with `add_bos=True`;
        without, the same ids minus the leading BOS)."""
        ids = [self.bos_id] if add_bos else []
        if not text:
            return ids
        if self.legacy:
            for chunk, token_id in self._split(text):
                ids.extend([token_id] if token_id is not None else self._sp.encode(chunk))
            return ids
        body: list[int] = []
        first_is_text = False
        for n, (chunk, token_id) in enumerate(self._split(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))):
            if token_id is not None:
                body.append(token_id)
                continue
            first_is_text = first_is_text or n == 0
            if chunk.startswith((SPIECE_UNDERLINE, " ")):
                # The dummy prefix is off, so encode behind "<unk>" and drop its pieces: keeps the leading "▁".
                body.extend(self._sp_plain.encode(self.unk_token + chunk)[self._unk_prefix_len :])
            else:
                body.extend(self._sp_plain.encode(chunk))
        # A text that starts with a special token loses the "▁" that the prepended underline produced.
        if len(body) > 1 and first_is_text and body[0] == self._underline_id and self._is_special(body[1]):
            body = body[1:]
        return ids + body

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Readable text for ids (added tokens verbatim, the image slot as `<|image|>`); meant for display,
        not as an exact inverse of `encode`."""
        parts: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                parts.append(self._sp.decode(run))
                run.clear()

        for token_id in (int(i) for i in ids):
            if token_id == IMAGE_TOKEN_INDEX:
                flush()
                parts.append(IMAGE_TOKEN)
            elif token_id in self._added:
                flush()
                if not (skip_special_tokens and self._is_special(token_id)):
                    parts.append(self._added[token_id].content)
            elif 0 <= token_id < self.vocab_size:
                run.append(token_id)
            else:
                raise ValueError(f"token id {token_id} is outside the vocabulary (size {len(self)})")
        flush()
        return "".join(parts)

    # ------------------------------------------------------------------ internals

    def _register(self, token_id: int, token: AddedToken) -> None:
        if token_id >= self.vocab_size and token_id != len(self):
            raise ValueError(
                f"added token {token.content!r} has id {token_id}, expected {len(self)} "
                f"(added ids must follow the {self.vocab_size}-piece vocabulary without gaps)"
            )
        if self._id_of_added(token.content) not in (None, token_id):
            raise ValueError(f"added token {token.content!r} appears twice with different ids")
        self._added[token_id] = token

    def _id_of_added(self, content: str) -> int | None:
        for token_id, token in self._added.items():
            if token.content == content:
                return token_id
        return None

    def _is_special(self, token_id: int) -> bool:
        token = self._added.get(token_id)
        return token is not None and (token.special or token.content == self.pad_token)

    def _rebuild(self) -> None:
        self._by_content = {t.content: i for i, t in self._added.items()}
        # Longest first: at a given position the longest added token wins, as with transformers' trie.
        alternatives = sorted(self._by_content, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(a) for a in alternatives) + ")")

    def _split(self, text: str) -> list[tuple[str, int | None]]:
        """Text -> [(chunk, None) | (token, id)], with the added tokens' lstrip/rstrip applied."""
        pieces = self._split_re.split(text)  # odd indices are added tokens
        is_token = [n % 2 == 1 for n in range(len(pieces))]
        for n in range(1, len(pieces), 2):
            token = self._added[self._by_content[pieces[n]]]
            left, right = pieces[n - 1], pieces[n + 1]
            if token.rstrip and right:
                pieces[n + 1] = right.lstrip()
            if token.lstrip and left:
                pieces[n - 1] = left.rstrip()
            if token.single_word and left and left[-1] != " ":
                pieces[n - 1] += pieces[n]
                pieces[n] = ""
            elif token.single_word and right and right[0] != " ":
                pieces[n + 1] = pieces[n] + pieces[n + 1]
                pieces[n] = ""
        return [
            (piece, self._by_content[piece] if token else None)
            for piece, token in zip(pieces, is_token, strict=True)
            if piece
        ]


# ---------------------------------------------------------------------- prompts


def tokenize_prompt(tokenizer: LlamaTokenizer, prompt: str) -> list[int]:
    """Ids of a prompt with exactly one `<|image|>`, which becomes `IMAGE_TOKEN_INDEX` (the reference's
    `tokenizer_image_token`: parts tokenized separately, BOS kept only on the first part)."""
    count = prompt.count(IMAGE_TOKEN)
    if count != 1:
        raise UserError(f"the prompt must contain {IMAGE_TOKEN} exactly once, found {count}: {prompt!r}")
    return _tokenize_with_image(tokenizer, prompt)


def _tokenize_with_image(tokenizer: LlamaTokenizer, text: str) -> list[int]:
    """`tokenizer_image_token` of DeQA-Score `src/mm_utils.py`, for any number of image slots.

    Every part is tokenized with BOS; when the first part is not empty its BOS is kept once at the start
    and dropped from all later parts. When the prompt starts with the image slot, the reference keeps the
    BOS of the next part (`[-200, 1, ...]`), and so does this.
    """
    parts = [tokenizer.encode(part, add_bos=True) if part else [] for part in text.split(IMAGE_TOKEN)]
    strip = 1 if parts[0] and parts[0][0] == tokenizer.bos_id else 0
    ids = [tokenizer.bos_id] if strip else []
    for n, part in enumerate(parts):
        if n:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(part[strip:])
    return ids


def level_token_ids(tokenizer: LlamaTokenizer, words: Sequence[str]) -> list[int]:
    """Id read for each level word: the first token of the word tokenized on its own
    (`tokenizer([word]).input_ids[0][1]` in DeQA-Score `src/evaluate/iqa_eval.py`), e.g. "good" -> "▁good".

    Raises UserError when a word gives no token or two words share their first token (their probabilities
    would be the same number).
    """
    ids = []
    for word in words:
        encoded = tokenizer.encode(word, add_bos=True)
        if len(encoded) < 2:
            raise UserError(f"level name {word!r} gives no token")
        ids.append(encoded[1])
    seen: dict[int, str] = {}
    for word, token_id in zip(words, ids, strict=True):
        if token_id in seen:
            piece = tokenizer.id_to_token(token_id)
            raise UserError(
                f"level names {seen[token_id]!r} and {word!r} both start with token {piece!r} (id {token_id}); "
                "use names whose first tokens differ"
            )
        seen[token_id] = word
    return ids


@dataclass(frozen=True)
class ChatTemplate:
    """mPLUG-Owl2's conversation format (`conv_mplug_owl2`, style TWO_NO_SYS, DeQA-Score `src/conversation.py`):
    `"USER: {user} ASSISTANT: {response}</s>"`.

    Where the image goes differs between the reference's training and evaluation. Training data holds
    `question + "\\n<|image|>"`, but `preprocess_multimodal` (`src/datasets/utils.py`) moves the image to the
    front: `"USER: <|image|>\\n{question} ASSISTANT: ..."` (`image_first=True`). Evaluation
    (`src/evaluate/iqa_eval.py`) keeps it after the question: `"USER: {question}\\n<|image|> ASSISTANT: ..."`.
    """

    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"
    sep: str = " "
    sep2: str = "</s>"
    image_first: bool = True

    def user_message(self, question: str) -> str:
        question = question.replace(IMAGE_TOKEN, "").strip()
        return f"{IMAGE_TOKEN}\n{question}" if self.image_first else f"{question}\n{IMAGE_TOKEN}"

    def conversation(self, question: str, response: str) -> str:
        """A full training conversation, ending with `sep2` (`</s>`)."""
        return f"{self.user_role}: {self.user_message(question)}{self.sep}{self.assistant_role}: {response}{self.sep2}"

    def prompt(self, question: str, response_prefix: str = RESPONSE_PREFIX) -> str:
        """A scoring prompt: the conversation up to the assistant's role, then `response_prefix`."""
        text = f"{self.user_role}: {self.user_message(question)}{self.sep}{self.assistant_role}:"
        return f"{text} {response_prefix}" if response_prefix else text


TRAIN_TEMPLATE = ChatTemplate(image_first=True)
EVAL_TEMPLATE = ChatTemplate(image_first=False)
# The papers' scoring prompt (training/evaluation template, one space before ASSISTANT).
DEFAULT_PROMPT = EVAL_TEMPLATE.prompt(DEFAULT_QUESTION)
# The authors' quick-start `model.score()` prompt (newline before ASSISTANT).
QUICKSTART_PROMPT = f"USER: {DEFAULT_QUESTION}\n{IMAGE_TOKEN}\nASSISTANT: {RESPONSE_PREFIX}"


def build_training_ids(
    tokenizer: LlamaTokenizer,
    question: str,
    response: str,
    template: ChatTemplate = TRAIN_TEMPLATE,
    *,
    max_length: int = 2048,
) -> tuple[list[int], list[int]]:
    """Input ids and labels of one training conversation, masked as the reference's `preprocess_v1`
    (DeQA-Score `src/datasets/utils.py`) masks them.

    The ids are `tokenize_prompt` of the whole conversation. Labels equal the ids except `IGNORE_INDEX`
    on the first two positions and on the instruction (`len(ids("USER: ... ASSISTANT: ")) - 3` more
    positions), which leaves the response tokens and the closing `</s>` as targets. If the token counts
    disagree (e.g. `<unk>` in the text, counted as padding), every label is masked, as the reference does.
    """
    conversation = template.conversation(question, response)
    input_ids = tokenize_prompt(tokenizer, conversation)
    labels = list(input_ids)
    total = sum(1 for i in input_ids if i != tokenizer.pad_id)
    assistant_sep = f"{template.sep}{template.assistant_role}: "
    cursor = 2  # BOS and the first instruction token, as the reference's `cur_len = 1 + 1`
    labels[:cursor] = [IGNORE_INDEX] * min(cursor, len(labels))
    for round_text in conversation.split(template.sep2):
        if not round_text:
            break
        parts = round_text.split(assistant_sep)
        if len(parts) != 2:
            break
        round_len = len(_tokenize_with_image(tokenizer, round_text)) - 1
        instruction_len = len(_tokenize_with_image(tokenizer, parts[0] + assistant_sep)) - 3
        end = min(cursor + instruction_len, len(labels))
        labels[cursor:end] = [IGNORE_INDEX] * max(end - cursor, 0)
        cursor += round_len
    labels[cursor:] = [IGNORE_INDEX] * max(len(labels) - cursor, 0)
    if cursor < max_length and cursor != total:
        labels = [IGNORE_INDEX] * len(labels)
    return input_ids, labels


# ---------------------------------------------------------------------- helpers


def _load_sp(proto: bytes) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as err:
        raise UserError(f"{TOKENIZER_MODEL} is not a sentencepiece model: {err}") from None
    return sp


def _read_json(path: Path) -> dict:
    """An optional tokenizer file: {} when absent."""
    return read_json_object(path) if path.is_file() else {}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_content(token: str | dict | None) -> str | None:
    """A special token as written in the config files: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _as_int(value: object, path: Path, key: str) -> int:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"{path}: token id {value!r} for {key!r} is not an integer") from None
