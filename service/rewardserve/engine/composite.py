"""Composite rewards: a weighted sum of named parts, hosted reward models and rule rewards.

A composite is a reward model of the repository whose manifest has a `composite:` section
(rewardserve.rewards.spec) and no weights of its own. Loading it loads the reward models its
parts name; scoring it scores each of those models once through its own batcher (all of them
at the same time) and computes the rule parts from the items' text. Per item:

    total = Σ weight · value,   parts = {part name: value before weighting}

and a composite's `reward` and `normalized_reward` are both that total: it has no reward
statistics of its own, and its model parts are already on the scale each part's `use` picks.
`tokens` and `truncated` are of the model parts (the sum of their tokens; truncated when any
of them cut the item); a composite of rules alone reads no tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from rewardserve.engine.inputs import Encoded
from rewardserve.registry.manifest import ModelManifest
from rewardserve.rewards.rules import response_of
from rewardserve.rewards.spec import CompositeSpec, Part
from rewardserve.schemas.errors import InvalidArgument, ServiceError, Unavailable
from rewardserve.schemas.scoring import ScoreItem, ScoreRequest, ScoreResponse, ScoreResult, Usage

if TYPE_CHECKING:
    from rewardserve.engine.scoring import ScoringEngine

T = TypeVar("T")


@dataclass(frozen=True)
class CompositeName:
    """What Best-of-N and PPO read of a reward model's scorer: its name, and the normalizer
    (the identity: a composite's total is its own normalized reward)."""

    name: str

    @staticmethod
    def normalizer(reward: float) -> float:
        return reward


async def _all(works: Sequence[Awaitable[T]]) -> list[T]:
    """Every result, or the first error with the other works cancelled (their queued items
    dropped at once rather than scored for nobody)."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class CompositeReward:
    """A loaded composite: its manifest, scored through the engine's loaded models."""

    def __init__(self, manifest: ModelManifest) -> None:
        assert manifest.composite is not None
        self.manifest = manifest
        self.spec: CompositeSpec = manifest.composite
        self.scorer = CompositeName(manifest.name)

    @property
    def name(self) -> str:
        return self.manifest.name

    def weights(self, override: dict[str, float] | None) -> dict[str, float]:
        """The manifest's part weights with the request's on top; a name that is no part is
        a 400 naming weights.<name>."""
        names = {p.name for p in self.spec.parts}
        for key in override or {}:
            if key not in names:
                raise InvalidArgument(
                    f"'{key}' is no part of composite '{self.name}' "
                    f"(its parts: {', '.join(sorted(names))})",
                    field=f"weights.{key}",
                )
        return self.spec.weights(override)

    def _check_labels(self, items: Sequence[ScoreItem], field_of: str) -> None:
        needs = [p.name for p in self.spec.parts if p.needs_label]
        if not needs:
            return
        for i, item in enumerate(items):
            if item.label is None:
                raise InvalidArgument(
                    f"composite '{self.name}' compares item {i} with its reference answer "
                    f"(part '{needs[0]}'): give its label",
                    field=f"{field_of}.{i}.label",
                )

    async def _model_values(
        self,
        engine: ScoringEngine,
        model_name: str,
        items: Sequence[ScoreItem],
        deadline: float,
        enforce_queue_limit: bool,
        field_of: str,
    ) -> tuple[list[Encoded], list[float], list[float]]:
        """(encodings, raw rewards, normalized rewards) of one model part's model."""
        try:
            model = engine.resolve(model_name)
        except ServiceError as e:
            raise Unavailable(
                f"composite '{self.name}' needs reward model '{model_name}': {e.message}"
            ) from None
        texts = [engine.render(model, it, f"{field_of}.{i}.messages") for i, it in enumerate(items)]
        # score_items: an ensemble part gives its combined reward and normalized reward
        _, encoded, scores = await engine.score_items(
            model.name,
            texts,
            field_of=field_of,
            deadline=deadline,
            enforce_queue_limit=enforce_queue_limit,
        )
        return encoded, [s.reward for s in scores], [s.normalized_reward for s in scores]

    async def evaluate(
        self,
        engine: ScoringEngine,
        items: Sequence[ScoreItem],
        *,
        weights: dict[str, float] | None = None,
        deadline: float | None = None,
        enforce_queue_limit: bool = True,
        field_of: str = "items",
        views: Sequence[tuple[str, str]] | None = None,
    ) -> list[ScoreResult]:
        """One result per item: `reward` = `normalized_reward` = the weighted total, `parts`
        each part's value. Arguments as ScoringEngine.score_texts takes them; `views`: each
        item's (prompt, response) for the rule parts, where the caller knows them better than
        rules.response_of can tell from the item."""
        w = self.weights(weights)
        self._check_labels(items, field_of)
        if deadline is None:
            deadline = time.monotonic() + engine.settings.request_timeout_s
        # one scoring call per distinct model, however many parts read it (raw and normalized)
        models = sorted({engine.repository.canonical(p.model or "") for p in self.spec.model_parts})
        works = [
            self._model_values(engine, m, items, deadline, enforce_queue_limit, field_of)
            for m in models
        ]
        scored = dict(zip(models, await _all(works), strict=True))
        if views is None:
            views = [response_of(it.prompt, it.response, it.messages, it.text) for it in items]
        results = []
        for i, item in enumerate(items):
            parts = {
                p.name: self._value(p, i, item, views[i], engine, scored) for p in self.spec.parts
            }
            total = sum(w[name] * v for name, v in parts.items())
            results.append(
                ScoreResult(
                    index=i,
                    reward=total,
                    normalized_reward=total,
                    truncated=any(enc[i].truncated for enc, _, _ in scored.values()),
                    tokens=sum(len(enc[i]) for enc, _, _ in scored.values()),
                    parts=parts,
                )
            )
        return results

    @staticmethod
    def _value(
        part: Part,
        i: int,
        item: ScoreItem,
        view: tuple[str, str],
        engine: ScoringEngine,
        scored: dict[str, tuple[list[Encoded], list[float], list[float]]],
    ) -> float:
        if part.model is None:
            return part.rule_value(view[0], view[1], item.label)
        _, raw, normalized = scored[engine.repository.canonical(part.model)]
        return normalized[i] if part.scale == "normalized" else raw[i]

    async def score(
        self, engine: ScoringEngine, req: ScoreRequest, timeout_s: float | None = None
    ) -> ScoreResponse:
        deadline = time.monotonic() + (timeout_s or engine.settings.request_timeout_s)
        results = await self.evaluate(engine, req.items, weights=req.weights, deadline=deadline)
        tokens = sum(r.tokens for r in results)
        return ScoreResponse(
            model=self.name,
            results=results,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )


async def load_composite(engine: ScoringEngine, manifest: ModelManifest) -> CompositeReward:
    """Check a composite's parts against the repository and load the models they name.

    A part that names no servable reward model is a 400 naming `model`; a part model that
    cannot load is that model's own error, prefixed with the composite and part."""
    assert manifest.composite is not None
    why = engine.repository.composite_problem(manifest.composite)
    if why:
        raise InvalidArgument(f"composite '{manifest.name}': {why}", field="model")
    for part in manifest.composite.model_parts:
        assert part.model is not None
        try:
            await engine.load(part.model)
        except ServiceError as e:
            e.message = f"composite '{manifest.name}', part '{part.name}': {e.message}"
            raise
    return CompositeReward(manifest)


# ---- OpenRLHF's /get_reward ----------------------------------------------------------------


def _label(value: object, field: str) -> str | None:
    """An OpenRLHF label as a reference answer: strings as they are, numbers as Python
    writes them (3 -> "3"); None and "" are no label."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise InvalidArgument(f"a label is a string or a number, not {value!r}", field=field)


def openrlhf_items(
    query: Sequence[str], prompts: Sequence[str] | None, labels: Sequence[object] | None
) -> tuple[list[ScoreItem], list[tuple[str, str]]]:
    """OpenRLHF's full texts as items (scored as raw text, as for any model) with their
    labels, and each one's (prompt, response) for the rules: the query after its prompt when
    it starts with it (OpenRLHF sends both), else as rules.response_of splits a text."""
    if labels is not None and len(labels) != len(query):
        raise InvalidArgument(f"{len(labels)} labels for {len(query)} queries", field="labels")
    items, views = [], []
    for i, q in enumerate(query):
        label = _label(labels[i], f"labels.{i}") if labels is not None else None
        items.append(
            ScoreItem.model_construct(
                prompt=None, response=None, messages=None, text=q, label=label
            )
        )
        p = prompts[i] if prompts is not None else None
        if p and q.startswith(p):
            views.append((p, q[len(p) :]))
        else:
            views.append(response_of(None, None, None, q))
    return items, views
