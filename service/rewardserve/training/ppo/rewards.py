"""Where rewards come from: the RewardSource protocol and the in-process scorer.

A source gives each sample its reward, and (an ensemble reward model) the members' rewards
and their standard deviation: RewardBatch. Sources that only know rewards (a custom
`score`, OpenRLHF's /get_reward, a single model) give None for both, and `score_batch`
wraps them, so the trainer asks every source the same way.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from rewardserve.bon.service import reward_item
from rewardserve.config import Settings
from rewardserve.engine.composite import CompositeReward
from rewardserve.engine.scoring import ScoringEngine
from rewardserve.rewards import objectives
from rewardserve.schemas.bon import PromptInput
from rewardserve.schemas.scoring import ScoreRequest, ScoreResult

T = TypeVar("T")


@dataclass(frozen=True)
class RewardBatch:
    rewards: list[float]
    """RAW rewards, one per response (for an ensemble: as the service combines its members)."""
    members: list[list[float] | None] | None = None
    """Each response's member rewards (normalized, as ScoreResult.members); None: not an
    ensemble (or a source that cannot tell)."""
    uncertainty: list[float] | None = None
    """Each response's standard deviation over the members (ScoreResult.uncertainty, on the
    normalized scale); None: not an ensemble."""

    @property
    def is_ensemble(self) -> bool:
        return self.uncertainty is not None


def batch_of_results(results: Sequence[Any]) -> RewardBatch:
    """RewardBatch of ScoreResult-shaped objects (REST, gRPC or in-process). `uncertainty` and
    `members` are read with getattr: a service (or engine) that predates them gives a
    single-model batch. A result with members but no uncertainty gets the members' std."""
    rewards = [float(r.reward) for r in results]
    members: list[list[float] | None] = []
    sigma: list[float | None] = []
    for r in results:
        m = getattr(r, "members", None)
        m = [float(x) for x in m] if m else None
        u = getattr(r, "uncertainty", None)
        if u is None and m is not None and len(m) > 1:
            u = objectives.std(m)  # the population std the service reports
        members.append(m)
        sigma.append(None if u is None else float(u))
    if all(u is None for u in sigma):
        return RewardBatch(rewards, None if all(m is None for m in members) else members)
    # an ensemble scores every sample; a missing σ here would be a service bug, not "certain"
    if any(u is None for u in sigma):
        raise ValueError("the reward service gave an uncertainty for some results only")
    return RewardBatch(rewards, members, [u for u in sigma if u is not None])


def score_batch(
    source: RewardSource, prompts: Sequence[PromptInput], responses: Sequence[str]
) -> RewardBatch:
    """The source's RewardBatch: its own `score_batch` where it has one, else its plain
    rewards (no members, no uncertainty)."""
    detailed = getattr(source, "score_batch", None)
    if detailed is not None:
        return detailed(prompts, responses)  # type: ignore[no-any-return]
    return RewardBatch(list(source.score(prompts, responses)))


class RewardSource(Protocol):
    model: str
    """The reward model's canonical name."""

    def score(self, prompts: Sequence[PromptInput], responses: Sequence[str]) -> list[float]:
        """RAW rewards (not normalised), one per response; prompts[i] pairs with
        responses[i]."""
        ...

    def close(self) -> None: ...

    # Optional (see score_batch): score_batch(prompts, responses) -> RewardBatch, and
    # `ensemble: bool | None` (None: the source cannot tell before it scores).


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
        # the manifest's `ensemble` section (read defensively: older manifests have none)
        composite = self.engine.composite(self.model)
        manifest = (composite or self.engine.resolve(self.model)).manifest
        self.ensemble: bool | None = getattr(manifest, "ensemble", None) is not None

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

    def score_batch(self, prompts: Sequence[PromptInput], responses: Sequence[str]) -> RewardBatch:
        """Rewards with an ensemble's members and uncertainty. A single model takes `score`'s
        path (the same rewards as ever); an ensemble goes through the engine's `score`, the
        path /v1/score takes, which is where members and uncertainty are made."""
        if not self.ensemble:
            return RewardBatch(self.score(prompts, responses))
        return batch_of_results(self.score_results(prompts, responses))

    def score_results(
        self, prompts: Sequence[PromptInput], responses: Sequence[str]
    ) -> list[ScoreResult]:
        """The ScoreResults /v1/score gives for these items (reward, normalized_reward and an
        ensemble's members and uncertainty), through the engine's `score`."""
        items = [reward_item(p, r) for p, r in zip(prompts, responses, strict=True)]
        results: list[ScoreResult] = []
        for start in range(0, len(items), self._chunk):
            # built unvalidated, as reward_item's items: an empty response is a legal answer
            req = ScoreRequest.model_construct(
                model=self.model, items=items[start : start + self._chunk]
            )
            results.extend(self._run(self.engine.score(req, timeout_s=3600.0)).results)
        return results

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
