"""What every policy backend offers: token prompts in, finished candidates out, as they finish.

A backend never scores or selects; Best-of-N (rewardserve.bon) does that on top of any of
them. Prompts arrive as token ids (rendered with the policy's own tokenizer and chat
template by the caller), so every backend sees exactly the same input.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


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


@dataclass(frozen=True)
class TokenDelta:
    """New tokens of one live candidate (see LiveCandidates)."""

    candidate: int
    """Its position in the list given to `open_candidates`."""
    token_ids: list[int]
    finish_reason: str | None = None
    """Set on its last delta: 'stop' or 'length'."""


class CandidateStream(Protocol):
    """Candidates generating in the engine, one request each, streamed token by token."""

    def __aiter__(self) -> AsyncIterator[TokenDelta]:
        """Deltas of every candidate as the engine makes them; ends when none runs. Deltas a
        candidate made before its abort reached the engine may still arrive after it."""
        ...

    async def abort(self, candidates: Iterable[int]) -> None:
        """Stop these candidates in the engine; the others run on."""
        ...


@runtime_checkable
class LiveCandidates(Protocol):
    """Optional capability of a backend: candidates kept alive in the engine, so speculative
    rejection stops the rejected ones and lets the survivors run on without a new prefill.
    Backends without it are driven in rounds through `generate` (bon.speculative)."""

    def open_candidates(
        self, prompts: Sequence[list[int]], samplings: Sequence[Sampling]
    ) -> AbstractAsyncContextManager[CandidateStream]:
        """One engine request per candidate: candidate k continues prompts[k], sampled with
        samplings[k] (n=1). Leaving the context aborts every candidate still running."""
        ...


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded, as vLLM and OpenAI do); whether one hit."""
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def derive_seed(seed: int | None, *parts: int) -> int | None:
    """A distinct, reproducible seed for a sub-request (one prompt of a batch, one round of
    speculative rejection); None stays None (unseeded). Hashed, not stepped: vLLM seeds the
    i-th of n samples with seed + i, so seeds of neighbouring prompts must lie far apart, or
    prompt p + 1 would draw the random numbers of prompt p's samples, shifted by one."""
    if seed is None:
        return None
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF
