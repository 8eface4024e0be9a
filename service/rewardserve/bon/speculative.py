"""Speculative rejection (Sun et al. 2024, "Fast Best-of-N Decoding via Speculative Rejection").

All n candidates of a prompt start together and grow `chunk_tokens` at a time. After each
chunk the reward model scores every candidate still running on its partial text, and the
lowest-scoring `rejection_rate` share of them stop there; the rest continue from their
token prefix (the prompt plus what they generated, prefilled again: the in-process vLLM
engine runs without its prefix cache, see vllm_backend). Candidates that finish on their
own are never rejected. It ends when none is running; the choice is made among the
finished candidates. Partial rewards predict final ones well enough that most of the
tokens spent on losers are saved; whether that saves time depends on the hardware (on 2
CPU cores a decode step costs about the same for 4 sequences as for 32, so it did not).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from rewardserve.policy.base import Generation, PolicyBackend, Sampling, derive_seed


def survivors(running: int, rejection_rate: float) -> int:
    """How many of `running` candidates continue after a round: at least one."""
    return max(1, math.ceil(running * (1 - rejection_rate)))


@dataclass
class _Partial:
    prompt_index: int
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str = ""
    reward: float = 0.0

    def as_generation(self) -> Generation:
        return Generation(
            self.prompt_index, self.index, self.token_ids, self.text, self.finish_reason
        )


ScoreFn = Callable[[Generation, str], Awaitable]


class SpeculativeRejection:
    def __init__(
        self,
        policy: PolicyBackend,
        prompts: Sequence[list[int]],
        n: int,
        sampling: Sampling,
        rejection_rate: float,
        chunk_tokens: int,
        score: ScoreFn,
    ) -> None:
        """`score(generation, finish_reason)` returns an event whose `.candidate.reward` is
        the reward of that (partial or final) text."""
        self.policy, self.prompts, self.n, self.sampling = policy, prompts, n, sampling
        self.rejection_rate, self.chunk_tokens, self.score = rejection_rate, chunk_tokens, score
        self.generated_tokens = 0
        self.rounds = 0
        self.generation_end = 0.0

    async def run(self) -> AsyncIterator:
        """Yields one scored event per candidate when it ends: finished, or rejected."""
        pool = [_Partial(p, i) for p in range(len(self.prompts)) for i in range(self.n)]
        running = list(pool)
        while running:
            step = min(self.chunk_tokens, self.sampling.max_tokens - len(running[0].token_ids))
            await self._grow(running, step)
            events = await asyncio.gather(
                *(self.score(c.as_generation(), c.finish_reason or "length") for c in running)
            )
            for c, e in zip(running, events, strict=True):
                c.reward = e.candidate.reward
            for c, e in zip(running, events, strict=True):
                if c.finished:
                    yield e
            still = [c for c in running if not c.finished]
            running = []
            for p in range(len(self.prompts)):
                mine = sorted(
                    (c for c in still if c.prompt_index == p), key=lambda c: (-c.reward, c.index)
                )
                if not mine:
                    continue
                keep = survivors(len(mine), self.rejection_rate)
                running += mine[:keep]
                for c in mine[keep:]:
                    yield await self.score(c.as_generation(), "rejected")
            self.rounds += 1

    async def _grow(self, running: list[_Partial], step: int) -> None:
        """Every running candidate one chunk longer (all of them in one generate call)."""
        prompts = [self.prompts[c.prompt_index] + c.token_ids for c in running]
        sampling = Sampling(
            self.sampling.temperature,
            self.sampling.top_p,
            step,
            derive_seed(self.sampling.seed, self.rounds),
            self.sampling.stop,
        )
        async for gen in self.policy.generate(prompts, 1, sampling):
            c = running[gen.prompt_index]
            c.token_ids = c.token_ids + gen.token_ids
            c.text += gen.text
            self.generated_tokens += len(gen.token_ids)
            if gen.finish_reason == "stop" or len(c.token_ids) >= self.sampling.max_tokens:
                c.finished, c.finish_reason = True, gen.finish_reason
        self.generation_end = time.perf_counter()
