"""Speculative rejection (Sun et al. 2024, "Fast Best-of-N Decoding via Speculative Rejection").

All n candidates of a prompt start together. At every `chunk_tokens` boundary the reward
model scores each candidate still running on its partial text, and the lowest-scoring
`rejection_rate` share of them stop there. Candidates that finish on their own before a
boundary are never rejected; the choice is made among the finished ones.

Two ways to drive a backend:
- live (backends with `open_candidates`, i.e. vLLM in process): one engine request per
  candidate, kept alive. At a boundary the rejected ones are aborted in the engine and the
  survivors run on while their partials are scored, with no new prefill. The decision at a
  boundary reads only the candidates' tokens up to it, never how far they ran ahead while
  being scored, so it does not depend on timing.
- rounds (transformers, a remote OpenAI server): every running candidate grows one chunk per
  `generate` call, continued from its exact token ids (prompt + what it generated so far).

Either way a candidate's text is decoded once from all its token ids (a chunk's own decode
would split multi-byte characters and drop SentencePiece's leading spaces at the joins), and
each candidate is scored once per boundary it reaches: a rejected one keeps the reward of
the partial text it was judged on.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewardserve.policy.base import (
    CandidateStream,
    Generation,
    LiveCandidates,
    PolicyBackend,
    Sampling,
    TokenDelta,
    cut_at_stop,
    derive_seed,
)


def survivors(running: int, rejection_rate: float) -> int:
    """How many of `running` candidates continue after a round: at least one."""
    return max(1, math.ceil(running * (1 - rejection_rate)))


def candidate_seed(seed: int | None, prompt_index: int, index: int) -> int | None:
    """Seed of candidate `index` of prompt `prompt_index` in its own engine request. vLLM
    seeds the i-th of n samples of a request with its seed + i (v1 parallel sampling), and
    full Best-of-N sends prompt p with derive_seed(seed, p): so on vLLM a speculative
    candidate is a prefix of the same full Best-of-N candidate, and the two strategies are
    compared on the same samples."""
    base = derive_seed(seed, prompt_index)
    return None if base is None else base + index


@dataclass(frozen=True)
class Ended:
    """A candidate at its end: `generation.finish_reason` is 'stop', 'length' or 'rejected'
    (then its text and tokens are the partial ones its reward was computed on)."""

    generation: Generation
    reward: Any
    """What the score function gave for that text (a float, or the service's ItemScore)."""


ScoreFn = Callable[[Generation], Awaitable[Any]]
"""The reward of a (partial or final) candidate's text; `key` makes it a number to rank."""


@dataclass
class _Candidate:
    prompt_index: int
    index: int
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    ended: bool = False


_Scored = tuple[_Candidate, Generation, Any]


@dataclass
class _Group:
    """The candidates of one prompt still in the race, and the boundary they race to."""

    members: list[_Candidate]
    boundary: int
    deciding: bool = False


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
        key: Callable[[Any], float] = float,
    ) -> None:
        self.policy, self.prompts, self.n, self.sampling = policy, prompts, n, sampling
        self.rejection_rate, self.chunk_tokens, self.score = rejection_rate, chunk_tokens, score
        self.key = key
        """The ranking value of a score (e.g. an ensemble objective); float for plain rewards."""
        self.generated_tokens = 0
        """Every token the backend generated, the run-ahead of aborted candidates included."""
        self.rounds = 0
        """Rejection decisions made (over all prompts)."""
        self.generation_end = 0.0

    # ---- shared --------------------------------------------------------------------------

    def _generation(self, c: _Candidate, upto: int | None, finish: str) -> Generation:
        """The candidate's first `upto` tokens (all: None), decoded in one piece."""
        ids = c.ids if upto is None else c.ids[:upto]
        text, _ = self._decode(ids)
        return Generation(c.prompt_index, c.index, list(ids), text, finish)

    def _decode(self, ids: Sequence[int]) -> tuple[str, bool]:
        """Text of `ids`, cut at the first stop string; whether one was hit (a stop string
        can straddle two chunks, so only the whole text can tell)."""
        text = self.policy.tokenizer.decode(list(ids), skip_special_tokens=True)
        return cut_at_stop(text, self.sampling.stop)

    def _rank(self, scored: Sequence[_Scored]) -> tuple[list[_Scored], list[_Scored]]:
        """(survivors, rejected) of one prompt's partial candidates: best reward first,
        the lower sample index among ties (reproducible)."""
        ranked = sorted(scored, key=lambda x: (-self.key(x[2]), x[0].index))
        keep = survivors(len(ranked), self.rejection_rate)
        return ranked[:keep], ranked[keep:]

    async def run(self) -> AsyncIterator[Ended]:
        """Yields every candidate once, when it ends: finished, or rejected."""
        pool = [_Candidate(p, i) for p in range(len(self.prompts)) for i in range(self.n)]
        runner = self._live if isinstance(self.policy, LiveCandidates) else self._in_rounds
        async for ended in runner(pool):
            yield ended

    # ---- live: one engine request per candidate ----------------------------------------------

    async def _live(self, pool: list[_Candidate]) -> AsyncIterator[Ended]:
        s = self.sampling
        samplings = [
            Sampling(
                s.temperature,
                s.top_p,
                s.max_tokens,
                candidate_seed(s.seed, c.prompt_index, c.index),
                s.stop,
            )
            for c in pool
        ]
        groups = [
            _Group([c for c in pool if c.prompt_index == p], self.chunk_tokens)
            for p in range(len(self.prompts))
        ]
        # One queue for the engine's deltas and the rewards coming back, so neither waits
        # for the other: candidates keep streaming while their partials are scored.
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        def spawn(coro: Awaitable[Any], kind: str, tag: Any = None) -> None:
            async def job() -> None:
                try:
                    await events.put((kind, (tag, await coro)))
                except asyncio.CancelledError:
                    raise
                except BaseException as e:  # raised in the consumer below
                    await events.put(("error", e))

            task = asyncio.create_task(job())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def advance(g: _Group) -> None:
            """Settle what the group's boundary already decides: candidates that finished
            within it end; when all others have reached it, their partials go to scoring."""
            if g.deciding:
                return
            for c in [c for c in g.members if c.finish_reason and len(c.ids) <= g.boundary]:
                g.members.remove(c)
                gen = self._generation(c, None, c.finish_reason)  # type: ignore[arg-type]
                spawn(self.score(gen), "final", gen)
            if g.members and all(len(c.ids) >= g.boundary for c in g.members):
                g.deciding = True
                partial = [self._generation(c, g.boundary, "rejected") for c in g.members]
                spawn(asyncio.gather(*(self.score(x) for x in partial)), "decided", (g, partial))

        async def pump(stream: CandidateStream) -> None:
            async for delta in stream:
                await events.put(("delta", delta))

        left = len(pool)
        async with self.policy.open_candidates(  # type: ignore[attr-defined]
            [self.prompts[c.prompt_index] for c in pool], samplings
        ) as stream:
            spawn(pump(stream), "pumped")
            try:
                while left:
                    kind, value = await events.get()
                    if kind == "error":
                        raise value
                    if kind == "delta":
                        d: TokenDelta = value
                        self.generated_tokens += len(d.token_ids)
                        self.generation_end = time.perf_counter()
                        c = pool[d.candidate]
                        if c.ended:  # run-ahead of a rejected candidate: counted, not kept
                            continue
                        c.ids += d.token_ids
                        if d.finish_reason is not None:
                            c.finish_reason = d.finish_reason
                        advance(groups[c.prompt_index])
                    elif kind == "final":
                        gen, reward = value
                        pool[gen.prompt_index * self.n + gen.index].ended = True
                        left -= 1
                        yield Ended(gen, reward)
                    elif kind == "decided":
                        (g, partial), rewards = value
                        self.rounds += 1
                        keep, drop = self._rank(list(zip(g.members, partial, rewards, strict=True)))
                        g.members = [c for c, _, _ in keep]
                        await stream.abort(c.prompt_index * self.n + c.index for c, _, _ in drop)
                        for c, gen, reward in drop:
                            c.ended = True
                            left -= 1
                            yield Ended(gen, reward)
                        g.boundary += self.chunk_tokens
                        g.deciding = False
                        advance(g)
                    elif any(not c.ended and c.finish_reason is None for c in pool):
                        # "pumped": the stream ended, yet a candidate neither finished nor
                        # was aborted
                        raise RuntimeError(f"policy '{self.policy.name}' ended a candidate early")
            finally:
                for t in list(tasks):
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    # ---- rounds: a backend without live candidates ------------------------------------------

    async def _in_rounds(self, pool: list[_Candidate]) -> AsyncIterator[Ended]:
        running = list(pool)
        while running:
            longest = max(len(c.ids) for c in running)
            step = max(1, min(self.chunk_tokens, self.sampling.max_tokens - longest))
            await self._grow(running, step)
            gens = [self._generation(c, None, c.finish_reason or "rejected") for c in running]
            rewards = await asyncio.gather(*(self.score(g) for g in gens))
            scored = list(zip(running, gens, rewards, strict=True))
            running = []
            for p in range(len(self.prompts)):
                for c, gen, reward in scored:
                    if c.prompt_index == p and c.finish_reason:
                        yield Ended(gen, reward)
                partial = [x for x in scored if x[0].prompt_index == p and not x[0].finish_reason]
                if partial:
                    keep, drop = self._rank(partial)
                    running += [c for c, _, _ in keep]
                    for _, gen, reward in drop:
                        yield Ended(gen, reward)
            self.rounds += 1

    async def _grow(self, running: list[_Candidate], step: int) -> None:
        """Every running candidate one chunk longer (all of them in one generate call),
        continued from its exact token ids."""
        prompts = [self.prompts[c.prompt_index] + c.ids for c in running]
        s = self.sampling
        sampling = Sampling(s.temperature, s.top_p, step, derive_seed(s.seed, self.rounds), s.stop)
        async for gen in self.policy.generate(prompts, 1, sampling):
            c = running[gen.prompt_index]
            c.ids = c.ids + list(gen.token_ids)
            self.generated_tokens += len(gen.token_ids)
            _, stopped = self._decode(c.ids)
            if gen.finish_reason == "stop" or stopped:
                c.finish_reason = "stop"
            elif len(c.ids) >= s.max_tokens:
                c.finish_reason = "length"
        self.generation_end = time.perf_counter()
