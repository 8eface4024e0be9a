"""One loaded reward model: encoded items in, scalar rewards out.

Each call is one padded forward over the items it is given. Which items share a forward
(length-homogeneous groups, so little padding) is the batcher's decision, not the scorer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jinja2 import TemplateError

from rewardserve.engine.inputs import Encoded, TemplatedText, TextEncoder
from rewardserve.modeling import pad_token_id, right_pad, sequence_rewards


class ChatTemplateError(ValueError):
    """The model's chat template refused the messages (role order, a role it lacks)."""


@dataclass
class Normalizer:
    mean: float = 0.0
    std: float = 1.0

    def __call__(self, reward: float) -> float:
        return (reward - self.mean) / self.std


class RewardScorer:
    """A reward model with its tokenizer and head; thread-compatible, not thread-safe."""

    def __init__(
        self,
        *,
        name: str,
        model: torch.nn.Module,
        tokenizer: Any,
        max_length: int,
        normalizer: Normalizer,
        head: str = "sequence_classification",
        value_head: torch.nn.Module | None = None,
        chat_template: bool = False,
    ) -> None:
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.normalizer = normalizer
        self.head = head
        self.value_head = value_head
        self.chat_template = chat_template
        self._encoder = TextEncoder(tokenizer, max_length)
        self.pad_id = pad_token_id(tokenizer)

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        return self._encoder(texts)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> TemplatedText:
        """The messages through the tokenizer's template, to be encoded without adding
        special tokens (the template writes them)."""
        try:
            return TemplatedText(self.tokenizer.apply_chat_template(messages, tokenize=False))
        except TemplateError as e:  # the template's raise_exception(), or a broken template
            raise ChatTemplateError(str(e)) from e

    @torch.inference_mode()
    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        """Raw rewards of already-encoded items, in the order given: one padded forward."""
        ids, mask = right_pad([e.input_ids for e in batch], self.pad_id)
        return sequence_rewards(self.model, ids, mask, self.value_head).tolist()
