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


class TextEncoder:
    """Texts -> token ids the way a model reads them, truncated on its `truncation_side`.

    Special tokens stay where the model expects them: a text's own tokens are cut to what is
    left of `max_length` after the special tokens, then the specials are added, and each
    result says whether it was cut. With a fast tokenizer this runs on a private copy of its
    Rust backend with padding and truncation switched off. The wrapper's own backend is not
    used because the wrapper rewrites that state on every call, so a copy nobody mutates is
    safe to share between threads without a lock.
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

    def __call__(self, texts: Sequence[str]) -> list[Encoded]:
        if self.backend is None:
            return self._encode_slow(texts)
        budget = self.max_length - self.backend.num_special_tokens_to_add(False)
        out = []
        for enc in self.backend.encode_batch(list(texts), add_special_tokens=False):
            cut = len(enc.ids) > budget
            if cut:
                enc.truncate(budget, direction=self.side)
            out.append(Encoded(self.backend.post_process(enc).ids, cut))
        return out

    def _encode_slow(self, texts: Sequence[str]) -> list[Encoded]:
        """A tokenizer without a Rust backend: one call without truncation gives the true
        lengths; only the texts that are too long are tokenized again, truncated."""
        tok = self.tokenizer
        full = tok(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        over = [i for i, ids in enumerate(full) if len(ids) > self.max_length]
        if over:
            cut = tok(
                [texts[i] for i in over],
                add_special_tokens=True,
                truncation=True,
                max_length=self.max_length,
            )["input_ids"]
            for i, ids in zip(over, cut, strict=True):
                full[i] = ids
        over_set = set(over)
        return [Encoded(list(ids), i in over_set) for i, ids in enumerate(full)]


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[Encoded]:
    """One-off encoding (training, tests); a server keeps one TextEncoder per model."""
    return TextEncoder(tokenizer, max_length)(texts)
