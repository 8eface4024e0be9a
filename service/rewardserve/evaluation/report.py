"""The Evaluation of scored pairs: every figure from the rewards and the texts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from rewardserve.evaluation import metrics, texts
from rewardserve.schemas.evaluation import ConfidenceSplit, Dataset, Evaluation, LengthBias
from rewardserve.training.reward.data import PreferencePair


@dataclass(frozen=True, slots=True)
class ScoredPair:
    chosen: float
    rejected: float
    """Raw rewards."""
    chosen_members: list[float] | None = None
    rejected_members: list[float] | None = None
    """Each member's normalized reward (ensembles only)."""

    @property
    def margin(self) -> float:
        return self.chosen - self.rejected


def length_bias(pairs: Sequence[PreferencePair], scored: Sequence[ScoredPair]) -> LengthBias:
    responses = [texts.response(t) for p in pairs for t in (p.chosen, p.rejected)]
    rewards = [r for s in scored for r in (s.chosen, s.rejected)]
    chars = [len(r) for r in responses]
    words = [texts.words(r) for r in responses]
    margins = np.array([s.margin for s in scored])
    chosen_chars, rejected_chars = np.array(chars[0::2]), np.array(chars[1::2])
    return LengthBias(
        responses=len(responses),
        pearson_chars=metrics.pearson(chars, rewards),
        spearman_chars=metrics.spearman(chars, rewards),
        pearson_words=metrics.pearson(words, rewards),
        spearman_words=metrics.spearman(words, rewards),
        chosen_shorter=metrics.accuracy(margins[chosen_chars < rejected_chars].tolist()),
        chosen_longer=metrics.accuracy(margins[chosen_chars > rejected_chars].tolist()),
    )


def member_uncertainty(scored: Sequence[ScoredPair]) -> list[float] | None:
    """Per pair: the population std over members of their reward differences; None unless
    every pair has the same number (≥ 2) of members on both sides."""
    sizes = {len(s.chosen_members or ()) for s in scored} | {
        len(s.rejected_members or ()) for s in scored
    }
    if len(sizes) != 1 or sizes.pop() < 2:
        return None
    diffs = np.array([np.subtract(s.chosen_members, s.rejected_members) for s in scored])
    return diffs.std(axis=1).tolist()  # type: ignore[no-any-return]


def confidence_split(scored: Sequence[ScoredPair]) -> ConfidenceSplit | None:
    sigma = member_uncertainty(scored)
    if sigma is None:
        return None
    confident, uncertain = metrics.median_split([s.margin for s in scored], sigma)
    return ConfidenceSplit(
        members=len(scored[0].chosen_members or ()),
        median_uncertainty=float(np.median(sigma)),
        mean_uncertainty=float(np.mean(sigma)),
        confident=confident,
        uncertain=uncertain,
    )


def build_evaluation(
    model: str,
    dataset: Dataset,
    pairs: Sequence[PreferencePair],
    scored: Sequence[ScoredPair],
    *,
    evaluated_at: datetime,
    seconds: float,
) -> Evaluation:
    if len(pairs) != len(scored) or not scored:
        raise ValueError(f"{len(scored)} scored pairs for {len(pairs)} pairs")
    margins = [s.margin for s in scored]
    return Evaluation(
        model=model,
        dataset=dataset,
        pairs=len(scored),
        distinct_prompts=len({texts.prompt(p.chosen) for p in pairs}),
        accuracy=metrics.accuracy(margins),
        ties=sum(1 for m in margins if m == 0),
        calibration=metrics.calibration(margins),
        length=length_bias(pairs, scored),
        ensemble=confidence_split(scored),
        evaluated_at=evaluated_at,
        seconds=seconds,
    )
