"""One loaded reward model: encoded items in, scalar rewards out.

Each call is one padded forward over the items it is given. Which items share a forward
(length-homogeneous groups, so little padding) is the batcher's decision, not the scorer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rewardserve.engine.inputs import Encoded, TextEncoder


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
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        return self._encoder(texts)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.inference_mode()
    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        """Raw rewards of already-encoded items, in the order given: one padded forward."""
        seqs = [e.input_ids for e in batch]
        longest = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        if self.head == "openrlhf":
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert self.value_head is not None
            values = self.value_head(hidden).squeeze(-1)
            last = mask.sum(dim=1) - 1  # right padding: last real token
            out = values.gather(1, last.unsqueeze(1)).squeeze(1)
        else:
            out = self.model(input_ids=ids, attention_mask=mask).logits[:, 0]
        return out.float().tolist()
