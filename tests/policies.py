"""Synthetic policies whose output distribution is known exactly, for Best-of-N statistics.

They implement the PolicyBackend interface (rewardserve.policy.base) without a model: the
subject of those tests is selection, not generation, and only a policy with enumerable
outputs lets a test compute what Best-of-N must choose (ScriptedPolicy: one whose candidates
are fixed token ids of a real tokenizer, for how speculative rejection assembles text).
Real policies (vLLM, transformers) are tested in tests/e2e.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from rewardserve.policy.base import Generation, Sampling, TokenDelta


class CharTokenizer:
    """Token id = character code; enough for prompts that only need counting."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> list[int]:
        return [ord(c) for m in messages for c in f"{m['role']}: {m['content']}\n"]

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return "".join(map(chr, ids))


class CategoricalPolicy:
    """Each candidate is `outputs[k]` with probability `probs[k]`, independently; the draws
    of one call come from random.Random(seed), so a seed fixes them."""

    kind = "synthetic"
    failure: str | None = None

    def __init__(
        self, outputs: Sequence[str], probs: Sequence[float], name: str = "synthetic"
    ) -> None:
        self.outputs, self.probs, self.name = list(outputs), list(probs), name
        self.tokenizer = CharTokenizer()
        self.max_model_len = 4096
        self.calls = 0

    def draws(self, seed: int | None, prompts: int, n: int) -> list[list[str]]:
        """The outputs one call draws: n per prompt, in order (tests replay them)."""
        rng = random.Random(seed)
        return [rng.choices(self.outputs, weights=self.probs, k=n) for _ in range(prompts)]

    async def generate(
        self, prompts: Sequence[list[int]], n: int, sampling: Sampling
    ) -> AsyncIterator[Generation]:
        self.calls += 1
        for p, texts in enumerate(self.draws(sampling.seed, len(prompts), n)):
            for i, text in enumerate(texts):
                yield Generation(p, i, [ord(c) for c in text], text, "stop")

    async def close(self) -> None:
        pass


class GrowingPolicy:
    """For speculative rejection: candidate quality is fixed by its first token and every
    later chunk repeats it, so partial text predicts the final reward exactly.

    A continuation's first character (drawn from the seeded RNG in prompt order) is a digit;
    each chunk appends `step` copies of it; a candidate whose digit is in `early_stop`
    finishes ('stop') after its first chunk.
    """

    kind = "synthetic"
    failure: str | None = None

    def __init__(self, prompt_len: int, early_stop: Sequence[str] = ()) -> None:
        self.name = "growing"
        self.tokenizer = CharTokenizer()
        self.max_model_len = 4096
        self.prompt_len = prompt_len
        self.early_stop = set(early_stop)
        self.generated = 0

    async def generate(
        self, prompts: Sequence[list[int]], n: int, sampling: Sampling
    ) -> AsyncIterator[Generation]:
        rng = random.Random(sampling.seed)
        for p, ids in enumerate(prompts):
            for i in range(n):
                so_far = ids[self.prompt_len :]
                digit = chr(so_far[0]) if so_far else str(rng.randrange(10))
                text = digit * sampling.max_tokens
                self.generated += len(text)
                done = digit in self.early_stop
                yield Generation(p, i, [ord(c) for c in text], text, "stop" if done else "length")

    async def close(self) -> None:
        pass


class ScriptedPolicy:
    """For speculative rejection's text assembly: candidate i of prompt p emits the token ids
    `scripts[p][i]` of a real tokenizer, then stops ('stop'); max_tokens cuts it ('length').
    The subject is how candidates are put together from chunks, not generation.

    Driven in rounds (`generate`, n=1): a prompt is a base prompt plus what its candidate
    generated so far; a candidate that has generated nothing yet is the next one of its
    prompt in call order, later ones are found by their prefix (scripts start distinct).
    """

    kind = "synthetic"
    failure: str | None = None

    def __init__(
        self, tokenizer: Any, prompts: Sequence[list[int]], scripts: Sequence[Sequence[list[int]]]
    ) -> None:
        self.name = "scripted"
        self.tokenizer = tokenizer
        self.max_model_len = 4096
        self.prompts = [list(p) for p in prompts]
        self.scripts = [[list(s) for s in per_prompt] for per_prompt in scripts]
        self.emitted = 0

    def _which(self, prompt: Sequence[int], fresh: dict[int, int]) -> tuple[list[int], int]:
        """(script, tokens already generated) of the candidate that `prompt` continues."""
        p = next(p for p, base in enumerate(self.prompts) if list(prompt[: len(base)]) == base)
        done = list(prompt[len(self.prompts[p]) :])
        if not done:
            fresh[p] = fresh.get(p, -1) + 1
            return self.scripts[p][fresh[p]], 0
        return next(s for s in self.scripts[p] if s[: len(done)] == done), len(done)

    async def generate(
        self, prompts: Sequence[list[int]], n: int, sampling: Sampling
    ) -> AsyncIterator[Generation]:
        assert n == 1, "speculative rounds ask one continuation per candidate"
        fresh: dict[int, int] = {}
        for k, prompt in enumerate(prompts):
            script, start = self._which(prompt, fresh)
            ids = script[start : start + sampling.max_tokens]
            self.emitted += len(ids)
            reason = "stop" if start + len(ids) == len(script) else "length"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            yield Generation(k, 0, ids, text, reason)

    async def close(self) -> None:
        pass


class LiveScriptedPolicy(ScriptedPolicy):
    """The same scripts through live candidates (policy.base.LiveCandidates): each candidate
    streams `burst` tokens at a time, all of them taking turns, so how far a candidate runs
    ahead while others are scored depends on `burst` and the event loop, never its tokens."""

    def __init__(self, *args: Any, burst: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.burst = burst
        self.samplings: list[Sampling] = []
        self.aborted: set[int] = set()

    @contextlib.asynccontextmanager
    async def open_candidates(
        self, prompts: Sequence[list[int]], samplings: Sequence[Sampling]
    ) -> AsyncIterator[_ScriptedStream]:
        self.samplings = list(samplings)
        fresh: dict[int, int] = {}
        scripts = [self._which(p, fresh)[0] for p in prompts]
        stream = _ScriptedStream(self, scripts, [s.max_tokens for s in samplings])
        try:
            yield stream
        finally:
            await stream.abort(range(len(scripts)))


class _ScriptedStream:
    def __init__(self, policy: LiveScriptedPolicy, scripts: list[list[int]], limits: list[int]):
        self.policy, self.scripts, self.limits = policy, scripts, limits
        self.sent = [0] * len(scripts)
        self.stopped: set[int] = set()

    async def __aiter__(self) -> AsyncIterator[TokenDelta]:
        while live := [k for k in range(len(self.scripts)) if k not in self.stopped]:
            for k in live:
                if k in self.stopped:  # aborted while the others took their turn
                    continue
                end = min(self.sent[k] + self.policy.burst, len(self.scripts[k]), self.limits[k])
                ids = self.scripts[k][self.sent[k] : end]
                self.sent[k] = end
                reason = None
                if end == len(self.scripts[k]):
                    reason = "stop"
                elif end == self.limits[k]:
                    reason = "length"
                if reason:
                    self.stopped.add(k)
                self.policy.emitted += len(ids)
                yield TokenDelta(k, ids, reason)
                await asyncio.sleep(0)

    async def abort(self, candidates: Iterable[int]) -> None:
        for k in candidates:
            if k not in self.stopped:
                self.stopped.add(k)
                self.policy.aborted.add(k)
