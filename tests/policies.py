"""Synthetic policies whose output distribution is known exactly, for Best-of-N statistics.

They implement the PolicyBackend interface (rewardserve.policy.base) without a model: the
subject of those tests is selection, not generation, and only a policy with enumerable
outputs lets a test compute what Best-of-N must choose. Real policies (vLLM, transformers)
are tested in tests/e2e.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

from rewardserve.policy.base import Generation, Sampling


class CharTokenizer:
    """Token id = character code; enough for prompts that only need counting."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages: list[dict[str, Any]], **_: Any) -> list[int]:
        return [ord(c) for m in messages for c in f"{m['role']}: {m['content']}\n"]


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
