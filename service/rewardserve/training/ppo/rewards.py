"""Where rewards come from: the RewardSource protocol and the in-process scorer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from rewardserve.bon.service import reward_item
from rewardserve.config import Settings
from rewardserve.engine.composite import CompositeReward
from rewardserve.engine.scoring import ScoringEngine
from rewardserve.schemas.bon import PromptInput

T = TypeVar("T")


class RewardSource(Protocol):
    model: str
    """The reward model's canonical name."""

    def score(self, prompts: Sequence[PromptInput], responses: Sequence[str]) -> list[float]:
        """RAW rewards (not normalised), one per response; prompts[i] pairs with
        responses[i]."""
        ...

    def close(self) -> None: ...


class InProcessReward:
    """The service's own ScoringEngine in this process, on a private event loop thread: the
    reward is what /v1/score and /v1/best-of-n give for the same prompt and response (same
    weights, template, truncation), without a network hop."""

    def __init__(self, settings: Settings, reward_model: str | None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ppo-reward-loop", daemon=True
        )
        self._thread.start()
        self.engine = ScoringEngine(settings)
        name = reward_model or self.engine.default_name()
        if name is None:
            raise ValueError("no reward model named and the repository has no default")
        info = self._run(self.engine.load(name))
        self.model: str = info.id
        self._chunk = settings.max_items_per_request

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def score(self, prompts: Sequence[PromptInput], responses: Sequence[str]) -> list[float]:
        composite = self.engine.composite(self.model)
        if composite is not None:
            return self._score_composite(composite, prompts, responses)
        loaded = self.engine.resolve(self.model)
        texts = [
            self.engine.render(loaded, reward_item(p, r))
            for p, r in zip(prompts, responses, strict=True)
        ]
        rewards: list[float] = []
        for start in range(0, len(texts), self._chunk):
            chunk = texts[start : start + self._chunk]
            # a training batch waits as long as it must: no request deadline applies to it
            work = self.engine.score_texts(
                self.model,
                chunk,
                deadline=time.monotonic() + 3600.0,
                enforce_queue_limit=False,
            )
            rewards.extend(self._run(work)[2])
        return rewards

    def _score_composite(
        self, composite: CompositeReward, prompts: Sequence[PromptInput], responses: Sequence[str]
    ) -> list[float]:
        """A composite's totals (its parts' weighted sum, each prompt's label going to its
        exact_match parts), as /v1/score gives them for the same items."""
        items = [reward_item(p, r) for p, r in zip(prompts, responses, strict=True)]
        rewards: list[float] = []
        for start in range(0, len(items), self._chunk):
            work = composite.evaluate(
                self.engine,
                items[start : start + self._chunk],
                deadline=time.monotonic() + 3600.0,
                enforce_queue_limit=False,
            )
            rewards.extend(r.reward for r in self._run(work))
        return rewards

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self.engine.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
