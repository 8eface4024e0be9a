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


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[Encoded]:
    """Tokenize, truncating on the tokenizer's `truncation_side` and flagging what was cut.

    One tokenizer call without truncation gives the true lengths; only the texts that are too
    long are tokenized again with truncation, so special tokens stay where the model expects.
    """
    full = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    over = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if over:
        cut = tokenizer(
            [texts[i] for i in over],
            add_special_tokens=True,
            truncation=True,
            max_length=max_length,
        )["input_ids"]
        for i, ids in zip(over, cut, strict=True):
            full[i] = ids
    over_set = set(over)
    return [Encoded(list(ids), i in over_set) for i, ids in enumerate(full)]
