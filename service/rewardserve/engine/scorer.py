"""One loaded reward model: text in, scalar rewards out.

Batches arrive from the batcher already tokenized. A forward pass pads to its longest
sequence, and on CPU the padded tokens cost as much as real ones, so a batch is split into
length-homogeneous micro-batches by `plan_microbatches` before it runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rewardserve.engine.inputs import Encoded, TextEncoder

# Per-forward fixed cost in token-equivalents (measured for all-MiniLM on this CPU): the
# optimiser below trades it against padding when it splits a batch.
FORWARD_OVERHEAD_TOKENS = 96
# Past a few thousand padded tokens a CPU forward stops getting cheaper per token (activations
# fall out of cache), so no micro-batch grows beyond this unless one sequence alone does.
MICROBATCH_MAX_TOKENS = 4096


def plan_microbatches(
    lengths: Sequence[int],
    overhead_tokens: int = FORWARD_OVERHEAD_TOKENS,
    max_tokens: int = MICROBATCH_MAX_TOKENS,
) -> list[list[int]]:
    """Split items into micro-batches that minimise padded tokens + per-forward overhead.

    Items are sorted by length; an optimal split of a sorted list into contiguous groups is a
    small dynamic programme (cost of a group = size x its longest + overhead; groups over
    `max_tokens` padded tokens are not allowed unless they hold one item). Returns lists of
    indices into `lengths`.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = lengths[order[end - 1]]
        for start in range(end - 1, -1, -1):
            if end - start > 1 and (end - start) * longest > max_tokens:
                break
            cost = best[start] + (end - start) * longest + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups: list[list[int]] = []
    end = n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


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
        """Raw rewards for already-encoded items, in the order given."""
        rewards = [0.0] * len(batch)
        for group in plan_microbatches([len(e) for e in batch]):
            values = self._forward_padded([batch[i].input_ids for i in group])
            for i, v in zip(group, values, strict=True):
                rewards[i] = v
        return rewards

    def _forward_padded(self, seqs: list[list[int]]) -> list[float]:
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
