"""The evaluation's figures on hand-made rewards whose answers are known."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from rewardserve.evaluation import metrics
from rewardserve.evaluation.report import ScoredPair, build_evaluation, member_uncertainty
from rewardserve.schemas.evaluation import Dataset
from rewardserve.training.reward.data import PreferencePair


def test_wilson_matches_the_published_interval() -> None:
    # 8 of 10: Wilson's 95 % interval is [0.4902, 0.9433] (Newcombe 1998, method 3)
    low, high = metrics.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    low, high = metrics.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)


def test_accuracy_counts_a_tie_as_half() -> None:
    acc = metrics.accuracy([1.0, 2.0, -1.0, 0.0])
    assert acc.value == pytest.approx(2.5 / 4)
    assert acc.n == 4
    assert (acc.ci_low, acc.ci_high) == pytest.approx(metrics.wilson_interval(2.5, 4))
    assert acc.ci_low < acc.value < acc.ci_high
    empty = metrics.accuracy([])
    assert empty.value is None and empty.n == 0


def _calibrated_margins(n: int, seed: int) -> list[float]:
    """Margins of a model calibrated by construction: each pair's 'chosen' is drawn to win
    with probability σ(margin), so σ(margin) is the truth."""
    rng = np.random.default_rng(seed)
    m = rng.normal(0, 2, n)
    chosen_wins = rng.random(n) < 1 / (1 + np.exp(-m))
    return np.where(chosen_wins, m, -m).tolist()  # label the winner "chosen"


def test_ece_of_a_calibrated_set_is_near_zero_and_of_an_overconfident_one_large() -> None:
    calibrated = _calibrated_margins(20_000, seed=0)
    cal = metrics.calibration(calibrated)
    assert cal.ece < 0.02
    # the same ranking, margins ×10: p near 0 or 1 while the accuracy stays what it was
    over = metrics.calibration([10 * m for m in calibrated])
    assert over.ece > 0.15
    assert sum(b.count for b in cal.bins) == 2 * len(calibrated)
    assert len(cal.bins) == 10 and cal.bins[0].lower == 0.0 and cal.bins[-1].upper == 1.0


def test_ece_by_hand() -> None:
    # two pairs at margin ln 3 (p = 0.75), one won, one lost: bin [0.7, 0.8) predicts 0.75
    # and observes 0.5; its mirror [0.2, 0.3) predicts 0.25, observes 0.5; ECE = 0.25
    m = math.log(3)
    cal = metrics.calibration([m, -m])
    assert cal.ece == pytest.approx(0.25)
    b = cal.bins[7]
    assert b.count == 2 and b.mean_predicted == pytest.approx(0.75) and b.observed == 0.5
    assert cal.log_loss == pytest.approx((math.log(1 + 1 / 3) + math.log(1 + 3)) / 2)


def test_correlations_have_the_sign_of_the_relation() -> None:
    x = [1, 2, 3, 4, 5]
    assert metrics.pearson(x, [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert metrics.spearman(x, [1, 4, 9, 16, 100]) == pytest.approx(1.0)
    assert metrics.spearman(x, [5, 3, 2, 1, 0]) == pytest.approx(-1.0)
    assert metrics.pearson(x, [3, 3, 3, 3, 3]) is None
    # ties share ranks: [1, 1, 2] ranks [1.5, 1.5, 3]
    expected = np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1]
    assert metrics.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(expected)


def test_median_split_takes_the_low_uncertainty_half_as_confident() -> None:
    margins = [1.0, 1.0, 1.0, -1.0, -1.0, 1.0]
    sigma = [0.1, 0.2, 0.3, 0.9, 0.8, 0.7]
    confident, uncertain = metrics.median_split(margins, sigma)
    assert (confident.value, confident.n) == (1.0, 3)
    assert (uncertain.value, uncertain.n) == (pytest.approx(1 / 3), 3)


def _conv(prompt: str, reply: str) -> str:
    return f"\n\nHuman: {prompt}\n\nAssistant: {reply}"


def test_evaluation_of_a_length_biased_ensemble() -> None:
    # rewards = length of the response: right when chosen is longer, wrong when shorter
    pairs = [
        PreferencePair(_conv("q1", "a long good answer"), _conv("q1", "no")),
        PreferencePair(_conv("q2", "ok"), _conv("q2", "a long rambling bad answer")),
        PreferencePair(_conv("q3", "a fine detailed answer"), _conv("q3", "meh")),
        PreferencePair(_conv("q3", "yes"), _conv("q3", "yes")),
    ]
    from rewardserve.evaluation.texts import response

    def members(text: str, spread: float) -> list[float]:
        n = float(len(response(text)))
        return [n - spread, n, n + spread]

    scored = [
        ScoredPair(
            len(response(p.chosen)),
            len(response(p.rejected)),
            members(p.chosen, i),
            members(p.rejected, -i),
        )
        for i, p in enumerate(pairs)
    ]
    e = build_evaluation(
        "m", Dataset(name="d.jsonl", path="/d.jsonl", sha256="0" * 64), pairs, scored,
        evaluated_at=datetime.now(UTC), seconds=0.1,
    )  # fmt: skip
    assert e.pairs == 4 and e.ties == 1 and e.distinct_prompts == 3
    assert e.accuracy.value == pytest.approx(2.5 / 4)
    assert e.length.pearson_chars == pytest.approx(1.0)
    assert e.length.spearman_chars == pytest.approx(1.0)
    assert (e.length.chosen_shorter.value, e.length.chosen_shorter.n) == (0.0, 1)
    assert (e.length.chosen_longer.value, e.length.chosen_longer.n) == (1.0, 2)
    assert e.ensemble is not None and e.ensemble.members == 3
    # member differences spread 2i: std = 2i·sqrt(2/3); pairs 0, 1 are the confident half
    sigma = member_uncertainty(scored)
    assert sigma == pytest.approx([2 * i * math.sqrt(2 / 3) for i in range(4)])
    assert e.ensemble.confident.n == 2 and e.ensemble.confident.value == 0.5
    assert e.ensemble.uncertain.value == pytest.approx(0.75)


def test_no_members_no_confidence_split() -> None:
    pairs = [PreferencePair(_conv("q", "a"), _conv("q", "bb"))]
    e = build_evaluation(
        "m", Dataset(name="d", path="/d", sha256="0" * 64), pairs, [ScoredPair(1.0, 0.0)],
        evaluated_at=datetime.now(UTC), seconds=0.0,
    )  # fmt: skip
    assert e.ensemble is None
