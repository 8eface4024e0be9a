"""A reward model's evaluation on preference pairs (`rewardserve eval-rm`, `reward_eval` jobs),
and the summary GET /v1/models shows of a model's latest one."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel


class Accuracy(BaseModel):
    """Pairwise accuracy over `n` pairs: the share where chosen scored above rejected, a tie
    (equal rewards) counting 0.5. The interval is Wilson's 95 % score interval, None when n=0."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int


class CalibrationBin(BaseModel):
    lower: float
    upper: float
    count: int
    """Entries in the bin (each pair enters twice, once per side: see Calibration)."""
    mean_predicted: float | None
    observed: float | None
    """Share of the bin's entries whose side was the chosen one."""


class Calibration(BaseModel):
    """Calibration of p = σ(reward(chosen) − reward(rejected)) on raw rewards: the scale the
    Bradley-Terry loss trained. Each pair enters the 10 equal-width bins over [0, 1] at p
    (outcome 1: chosen won) and at 1 − p (outcome 0), so the diagram does not depend on
    which side a file lists first; the ECE this gives equals the ECE of the confidence
    max(p, 1 − p) against "the predicted side is the chosen one"."""

    ece: float
    """Σ_bins count/total · |observed − mean_predicted|."""
    log_loss: float
    """Mean −log σ(margin): the Bradley-Terry loss on these pairs."""
    bins: list[CalibrationBin]


class LengthBias(BaseModel):
    """Reward against the response's length (the final Assistant turn) over every scored
    response (2 per pair). Words are whitespace-separated, not model tokens, so the figure
    is the same whichever transport scored."""

    responses: int
    pearson_chars: float | None
    spearman_chars: float | None
    pearson_words: float | None
    spearman_words: float | None
    chosen_shorter: Accuracy
    """Accuracy on pairs whose chosen response has fewer characters than the rejected one
    (a length-biased model does worse here)."""
    chosen_longer: Accuracy
    """Accuracy on pairs whose chosen response has more characters."""


class ConfidenceSplit(BaseModel):
    """Ensembles only: per-pair uncertainty is the standard deviation (population, over
    members) of each member's normalized reward difference chosen − rejected; pairs are split
    at the median into the more-confident (lower uncertainty) and less-confident halves."""

    members: int
    median_uncertainty: float
    mean_uncertainty: float
    confident: Accuracy
    uncertain: Accuracy


class Dataset(BaseModel):
    name: str
    path: str
    sha256: str
    """Of the file as read."""
    split: str | None = None
    """Which of the file's pairs were scored when not all: e.g. the grouped held-out split
    that `train-rm --eval-fraction F --seed S` kept out of training."""


class Evaluation(BaseModel):
    model: str
    dataset: Dataset
    pairs: int
    """Pairs scored (the file's first max_pairs when capped)."""
    distinct_prompts: int
    """Distinct prompts among them (the conversation before the final Assistant turn). The
    interval treats pairs as independent; fewer prompts than pairs make it too narrow."""
    accuracy: Accuracy
    ties: int
    """Pairs whose two rewards were equal (each counted 0.5 in the accuracy)."""
    reward_scale: Literal["raw"] = "raw"
    calibration: Calibration
    length: LengthBias
    ensemble: ConfidenceSplit | None = None
    """Set when the scores carried members (an ensemble)."""
    evaluated_at: datetime
    seconds: float
    """Wall time of loading and scoring."""


class EvaluationSummary(BaseModel):
    """What GET /v1/models shows of a reward model's latest evaluation."""

    data: str
    """The data set's name (its file name)."""
    pairs: int
    accuracy: float
    ci_low: float
    ci_high: float
    ece: float
    evaluated_at: datetime

    @classmethod
    def of(cls, e: Evaluation) -> EvaluationSummary:
        acc = e.accuracy
        assert acc.value is not None and acc.ci_low is not None and acc.ci_high is not None
        return cls(
            data=e.dataset.name,
            pairs=e.pairs,
            accuracy=acc.value,
            ci_low=acc.ci_low,
            ci_high=acc.ci_high,
            ece=e.calibration.ece,
            evaluated_at=e.evaluated_at,
        )
