"""Ensemble objectives (Coste et al. 2023) on hand-made member rewards."""

from __future__ import annotations

import pytest

from rewardserve.rewards.objectives import OBJECTIVES, objective_value, objective_values

MEMBERS = [
    [1.0, 2.0, 3.0],  # mean 2, min 1, population variance 2/3
    [0.5, 0.5, 0.5],  # the members agree: variance 0
    [-1.0, 3.0, 1.0],  # mean 1, min -1, variance 8/3
]


def test_mean_worst_case_and_uncertainty_weighted_on_a_matrix() -> None:
    assert objective_values("mean", MEMBERS) == pytest.approx([2.0, 0.5, 1.0])
    assert objective_values("worst_case", MEMBERS) == [1.0, 0.5, -1.0]
    assert objective_values("uncertainty_weighted", MEMBERS, lam=0.5) == pytest.approx(
        [2.0 - 0.5 * 2 / 3, 0.5, 1.0 - 0.5 * 8 / 3]
    )
    # λ = 0: uncertainty_weighted is the mean
    assert objective_values("uncertainty_weighted", MEMBERS, lam=0.0) == pytest.approx(
        objective_values("mean", MEMBERS)
    )


def test_members_that_agree_give_every_objective_the_same_value() -> None:
    for name in OBJECTIVES:
        assert objective_value(name, [0.25, 0.25, 0.25], lam=3.0) == 0.25


def test_one_model_every_objective_is_the_plain_reward() -> None:
    for name in OBJECTIVES:
        assert objective_value(name, None, lam=5.0, reward=1.5) == 1.5
        assert objective_value(name, [0.7], lam=5.0, reward=1.5) == 1.5  # one member
        assert objective_value(name, [0.7], lam=5.0) == 0.7
    rows = [None, [2.0, 4.0]]
    assert objective_values("worst_case", rows, rewards=[9.0, 3.0]) == [9.0, 2.0]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown objective"):
        objective_value("median", [1.0, 2.0])
    with pytest.raises(ValueError, match="lambda"):
        objective_value("uncertainty_weighted", [1.0, 2.0], lam=-1.0)
    with pytest.raises(ValueError, match="no members"):
        objective_value("mean", None)
    with pytest.raises(ValueError, match="2 rewards for 3 rows"):
        objective_values("mean", MEMBERS, rewards=[1.0, 2.0])
