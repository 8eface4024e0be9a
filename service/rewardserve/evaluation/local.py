"""Scoring in this process through the service's own ScoringEngine (the batcher, the
truncation and the normalizer the server uses), for `rewardserve eval-rm`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from rewardserve.config import Settings
from rewardserve.engine.scoring import ScoringEngine
from rewardserve.evaluation.run import ScoreFn
from rewardserve.registry.repository import ModelRepository
from rewardserve.schemas.scoring import ScoreItem, ScoreRequest, ScoreResult


@asynccontextmanager
async def engine_scorer(settings: Settings, model: str) -> AsyncIterator[tuple[str, ScoreFn]]:
    """(the model's canonical name, a ScoreFn) with only `model` loaded. Raises the engine's
    NotFound / InvalidArgument (field `model`) for a model it cannot serve."""
    engine = ScoringEngine(settings, ModelRepository.from_settings(settings))
    try:
        info = await engine.load(model)
        name = info.id

        async def score(texts: Sequence[str]) -> list[ScoreResult]:
            items = [ScoreItem(text=t) for t in texts]
            return (await engine.score(ScoreRequest(model=name, items=items))).results

        yield name, score
    finally:
        await engine.close()
