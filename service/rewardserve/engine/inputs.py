"""Turns score items into token ids the way a reward model was trained to read them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class ChatMessage(Protocol):
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: list[int]
    truncated: bool

    def __len__(self) -> int:
        return len(self.input_ids)


HH_ROLES = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}


def render_hh(messages: Sequence[ChatMessage]) -> str:
    """Chat messages as HH-RLHF text, the format the default reward model was trained on."""
    return "".join(f"\n\n{HH_ROLES.get(m.role, m.role.title())}: {m.content}" for m in messages)


def join_pair(prompt: str, response: str) -> str:
    """A (prompt, response) pair as one text.

    HH-style prompts end with "Assistant:" and responses are appended after one space, exactly
    as the conversations in the preference data; other prompts are joined with a newline.
    """
    if prompt.rstrip().endswith("Assistant:"):
        return prompt.rstrip() + " " + response.lstrip()
    if not prompt:
        return response
    return prompt + "\n" + response


class TemplatedText(str):
    """A rendered chat template: text that already holds every special token it should.

    The encoder adds none to it, as transformers' apply_chat_template(tokenize=True) does
    (the template writes the BOS itself; adding the tokenizer's would make it two). A str, so
    it passes unchanged through every path that takes rendered texts.
    """

    __slots__ = ()


class TextEncoder:
    """Texts -> token ids the way a model reads them, truncated on its `truncation_side`.

    A plain text gets the special tokens the tokenizer adds (BERT's [CLS] ... [SEP], Llama's
    BOS) unless it already carries them: OpenRLHF sends queries decoded with their special
    tokens, so one that starts with the model's BOS keeps that one and gets no second. A
    TemplatedText gets none added. Either way the specials stay where the model expects them:
    a text's own tokens are cut to what is left of `max_length` after the specials, and each
    result says whether it was cut.

    With a fast tokenizer this runs on a private copy of its Rust backend with padding and
    truncation switched off. The wrapper's own backend is not used because the wrapper
    rewrites that state on every call, so a copy nobody mutates is safe to share between
    threads without a lock.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.side = tokenizer.truncation_side
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = None
        if backend is not None:
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(backend.to_str())
            self.backend.no_padding()
            self.backend.no_truncation()
        self.prefix, self.suffix = self._specials()

    def _specials(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a single text."""
        tok = self.tokenizer
        with_specials = list(tok("a", add_special_tokens=True)["input_ids"])
        own = list(tok("a", add_special_tokens=False)["input_ids"])
        for start in range(len(with_specials) - len(own) + 1):
            if own and with_specials[start : start + len(own)] == own:
                return with_specials[:start], with_specials[start + len(own) :]
        return [], []  # the text's own tokens changed: no specials around it that we can place

    def _bodies(self, texts: Sequence[str]) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def __call__(self, texts: Sequence[str]) -> list[Encoded]:
        return [
            self._assemble(list(ids), not isinstance(text, TemplatedText))
            for text, ids in zip(texts, self._bodies(texts), strict=True)
        ]

    def _assemble(self, ids: list[int], add_specials: bool) -> Encoded:
        # The text's own leading/trailing specials are set aside like added ones, so
        # truncation never cuts them.
        pre, suf = self.prefix, self.suffix
        start = len(pre) if pre and ids[: len(pre)] == pre else 0
        end = len(ids)
        if suf and end - start >= len(suf) and ids[end - len(suf) :] == suf:
            end -= len(suf)
        body = ids[start:end]
        pre = pre if start or add_specials else []
        suf = suf if end < len(ids) or add_specials else []
        budget = self.max_length - len(pre) - len(suf)
        cut = len(body) > budget
        if cut:
            body = body[len(body) - budget :] if self.side == "left" else body[:budget]
        return Encoded([*pre, *body, *suf], cut)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[Encoded]:
    """One-off encoding (training, tests); a server keeps one TextEncoder per model."""
    return TextEncoder(tokenizer, max_length)(texts)
