"""The chat-template prompt and the level-token checks of a transformers vision-language model (a mixin of
`HFVisionLanguageBackbone`: it reads the backbone's processor, tokenizer and image token)."""

from __future__ import annotations

from iqa_cli.constants import RESPONSE_PREFIX
from iqa_cli.errors import UserError


class PromptMixin:
    """Prompt rendering and level tokens."""

    def render_prompt(self, question: str, response: str = RESPONSE_PREFIX) -> str:
        """The family's chat template over [image, question] and the assistant's answer continued from
        `response` (no end-of-turn after it): the level is the next token."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": response}]},
        ]
        text = self.processor.apply_chat_template(messages, continue_final_message=True, tokenize=False)
        return self.with_one_image_token(text)

    def with_one_image_token(self, text: str) -> str:
        """`text`, checked to hold the image token once: a template that drops or repeats it misplaces the image."""
        if text.count(self.image_token) != 1:
            raise UserError(
                f"{self.source}: the chat template renders {text.count(self.image_token)} image tokens"
                f" {self.image_token!r} for one image: {text!r}"
            )
        return text

    def encode_prompt(self, prompt: str) -> list[int]:
        """Ids of the rendered text as the processor tokenizes it (a template that starts with the BOS token
        gets no second one)."""
        bos = self.tokenizer.bos_token
        add_special = not (bos is not None and prompt.startswith(bos))
        return list(self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"])

    def task_prompt(self, task: str, *, video: bool = False) -> str:
        """The chat template with the task's question and answer (`iqa_cli.tasks`). A video's prompt is an image's
        with "this video": its frames take the image slot (the video transform expands it with the video's ids)."""
        from iqa_cli.tasks import question, response_prefix

        return self.render_prompt(question(task, video), response_prefix(task, video))

    def default_scoring(self) -> tuple[str, list[int], str | None]:
        return self.default_prompt, [], "last" if self.has_regressor else None

    def level_tokens(self, word: str, prompt: str | None = None) -> list[str]:
        """The tokens `word` becomes where it stands after the prompt (after a space, as in the response)."""
        prompt = self.default_prompt if prompt is None else prompt
        before = self.encode_prompt(prompt)
        after = self.encode_prompt(f"{prompt} {word}")
        if after[: len(before)] != before:  # the word merged with the prompt's last token
            return self.tokenizer.convert_ids_to_tokens(after[len(before) - 1 :])
        return self.tokenizer.convert_ids_to_tokens(after[len(before) :])

    def level_token_id(self, word: str) -> int:
        """An added token by name (Q-Scorer's <scoreK>), else the one token of " word" after the prompt; a word
        that is not one token there is a one-line UserError naming its tokens and one-token alternatives."""
        added = self.tokenizer.get_added_vocab()
        if word in added:
            return added[word]
        tokens = self.level_tokens(word)
        if len(tokens) != 1:
            raise UserError(
                f"level word {word!r} is {len(tokens)} tokens {tokens} after the prompt of {self.source}, not one;"
                f" {self._alternatives(word)}"
            )
        return int(self.tokenizer.convert_tokens_to_ids(tokens[0]))

    def _alternatives(self, word: str) -> str:
        variants = dict.fromkeys([word.lower(), word.capitalize(), word.upper()])
        single = [v for v in variants if len(self.level_tokens(v)) == 1 and v != word]
        if single:
            return f"one-token alternatives: {', '.join(single)}"
        return "no case variant is one token; choose another word (or Q-Scorer's --method qscorer score tokens)"

    def level_token_ids(self, words: list[str] | tuple[str, ...]) -> list[int]:
        ids = [self.level_token_id(w) for w in words]
        if len(set(ids)) != len(ids):
            raise UserError(f"level words {list(words)} do not map to distinct tokens: {ids}")
        return ids
