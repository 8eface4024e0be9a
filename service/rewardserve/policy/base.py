"""What every policy backend offers: token prompts in, finished candidates out, as they finish.

A backend never scores or selects; Best-of-N (rewardserve.bon) does that on top of any of
them. Prompts arrive as token ids (rendered with the policy's own tokenizer and chat
template by the caller), so every backend sees exactly the same input.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    """Same seed, same request: same candidates (per backend; backends differ)."""
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generation:
    """One finished candidate."""

    prompt_index: int
    """Which of the prompts given to `generate` it continues."""
    index: int
    """Its sample number among the n of that prompt (0..n-1)."""
    token_ids: list[int] = field(repr=False)
    text: str
    finish_reason: str
    """'stop' (end of sequence or a stop string) or 'length' (max_tokens reached)."""


class PolicyBackend(Protocol):
    name: str
    kind: str
    """'vllm', 'transformers' or 'openai'."""
    tokenizer: Any
    """The policy's Hugging Face tokenizer: chat template, prompt token counts."""
    max_model_len: int
    failure: str | None
    """Why the backend can serve nothing more (its engine died); None while it is healthy."""

    def generate(
        self, prompts: Sequence[list[int]], n: int, sampling: Sampling
    ) -> AsyncIterator[Generation]:
        """n samples of each prompt, yielded one by one as each finishes."""
        ...

    async def close(self) -> None: ...


def derive_seed(seed: int | None, *parts: int) -> int | None:
    """A distinct, reproducible seed for a sub-request (one prompt of a batch, one round of
    speculative rejection); None stays None (unseeded)."""
    if seed is None:
        return None
    value = seed & 0xFFFFFFFF
    for p in parts:
        value = (value * 1_000_003 + p + 1) & 0x7FFFFFFF
    return value
