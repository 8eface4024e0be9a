"""Ensemble objectives (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
Overoptimization"): one reward out of the rewards an ensemble's members give one sample.

- mean: the members' mean.
- worst_case: the lowest member (WCO): a sample scores only as well as its most sceptical
  member rates it.
- uncertainty_weighted: mean − λ·variance (UWO), population variance over the members: the
  members' disagreement is charged against the reward.

With one model there is nothing to combine: for `members` None or a single member, every
objective is the plain reward (the caller passes it as `reward`), so a non-ensemble reward
model behaves exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

Objective = Literal["mean", "worst_case", "uncertainty_weighted"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)


def _check(name: str, lam: float) -> None:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{name}' ({' | '.join(OBJECTIVES)})")
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")


def population_variance(members: Sequence[float]) -> float:
    n = len(members)
    mean = sum(members) / n
    return sum((m - mean) ** 2 for m in members) / n


def objective_value(
    name: str, members: Sequence[float] | None, lam: float = 1.0, reward: float | None = None
) -> float:
    """The objective `name` of one sample's member rewards. `reward`: the plain reward, what
    every objective is when `members` is None or holds one member (without it, that one
    member)."""
    _check(name, lam)
    if not members or len(members) == 1:
        if reward is not None:
            return float(reward)
        if not members:
            raise ValueError("no members and no reward to fall back on")
        return float(members[0])
    if name == "worst_case":
        return float(min(members))
    if max(members) == min(members):
        # members that agree: their common value, exactly (a sum then division could round)
        return float(members[0])
    if name == "mean":
        return sum(members) / len(members)
    return sum(members) / len(members) - lam * population_variance(members)


def objective_values(
    name: str,
    members_matrix: Sequence[Sequence[float] | None],
    lam: float = 1.0,
    rewards: Sequence[float] | None = None,
) -> list[float]:
    """objective_value of each row (one row per sample); `rewards[i]` is row i's plain
    reward, used where the row has no members or one."""
    _check(name, lam)
    if rewards is not None and len(rewards) != len(members_matrix):
        raise ValueError(f"{len(rewards)} rewards for {len(members_matrix)} rows of members")
    return [
        objective_value(name, row, lam, None if rewards is None else rewards[i])
        for i, row in enumerate(members_matrix)
    ]
