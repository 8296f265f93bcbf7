"""Prompt assembly: split a task prompt around the chat template into prefix / document / suffix.

The prefix (template header, instruction) is kept whole, the document is compressed, the suffix
(question, assistant header, answer prefix) is prefilled after compression. The probe is the suffix
rendered with the probe text in place of the question, so observation queries look like the question
the model will really see.
"""

from __future__ import annotations

from dataclasses import dataclass

_DOC = "\u2063DYNKV_DOCUMENT\u2063"


@dataclass
class TaskPrompt:
    """Text around the document. ``{question}`` in ``after_document`` is replaced by the question."""

    system: str | None = None
    before_document: str = ""
    after_document: str = "\n\n{question}"
    answer_prefix: str = ""
    use_chat_template: bool = True

    def render(self, tokenizer, question: str) -> tuple[str, str]:
        """Return ``(prefix_text, suffix_text)`` for one question."""
        user = self.before_document + _DOC + self.after_document.replace("{question}", question)
        template = getattr(tokenizer, "chat_template", None)
        if self.use_chat_template and template:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
                {"role": "user", "content": user}
            ]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = (self.system + "\n\n" if self.system else "") + user
        prefix, _, suffix = text.partition(_DOC)
        return prefix, suffix + self.answer_prefix


@dataclass
class PromptIds:
    prefix: list[int]
    suffix: list[int]


def encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _wants_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def prompt_ids(tokenizer, prompt: TaskPrompt, question: str) -> PromptIds:
    """Token ids of prefix and suffix; a BOS is added when the tokenizer adds one and the text lacks it."""
    prefix_text, suffix_text = prompt.render(tokenizer, question)
    prefix = encode(tokenizer, prefix_text)
    if _wants_bos(tokenizer) and (not prefix or prefix[0] != tokenizer.bos_token_id):
        prefix = [tokenizer.bos_token_id] + prefix
    return PromptIds(prefix, encode(tokenizer, suffix_text))
