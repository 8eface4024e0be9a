"""Ensemble objectives (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
Overoptimization"), over the members' rewards of one sample.

- mean: the members' mean.
- worst_case: the lowest member (WCO): a sample scores only as well as its most sceptical
  member rates it.
- uncertainty_weighted: mean − λ·variance (UWO): the members' disagreement is charged
  against the reward.

The variance (and `std`, the `uncertainty` the service reports) is the population one, 1/k
over k members, as Coste et al. write it: so uncertainty_weighted = mean − λ·std², and a
one-member "ensemble" has variance 0. With one model there is nothing to combine: for
`members` None or a single member every objective is the plain reward (the caller may pass it
as `reward`), so a non-ensemble reward model behaves exactly as before.

Serving (Best-of-N, rerank) uses `objective_value`; PPO scores whole batches with
`objective_values`, over rows that may lack members, or over a (samples x members) matrix,
numpy or torch alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np

Objective = Literal["mean", "worst_case", "uncertainty_weighted"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)


def mean(members: Sequence[float]) -> float:
    # math.fsum: exact summation, so the mean does not depend on the members' order
    return math.fsum(members) / len(members)


def variance(members: Sequence[float]) -> float:
    """Population variance (1/k) of the members' rewards."""
    m = mean(members)
    return math.fsum((x - m) ** 2 for x in members) / len(members)


def std(members: Sequence[float]) -> float:
    return math.sqrt(variance(members))


def _check(name: str, lam: float) -> None:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; one of {', '.join(OBJECTIVES)}")
    if not lam >= 0:  # also refuses NaN
        raise ValueError(f"uncertainty lambda must be >= 0, got {lam}")


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
            raise ValueError(
                "no members and no reward to fall back on: an objective needs one of them"
            )
        return float(members[0])
    if name == "worst_case":
        return float(min(members))
    if max(members) == min(members):
        # members that agree: their common value, exactly (a sum then division could round)
        return float(members[0])
    if name == "mean":
        return mean(members)
    return mean(members) - lam * variance(members)


def objective_values(
    name: str,
    members_matrix: Any,
    lam: float = 1.0,
    rewards: Sequence[float] | None = None,
) -> Any:
    """The objective of each sample.

    A numpy array or torch tensor of shape (samples x members) gives an array (a tensor: same
    device and dtype) computed at once. Any other sequence of rows gives a list of
    `objective_value`s, each row possibly None or one member, `rewards[i]` being row i's
    plain reward to fall back on.
    """
    _check(name, lam)
    if rewards is None and (_is_tensor(members_matrix) or isinstance(members_matrix, np.ndarray)):
        return _matrix_values(name, members_matrix, lam)
    if rewards is not None and len(rewards) != len(members_matrix):
        raise ValueError(f"{len(rewards)} rewards for {len(members_matrix)} rows of members")
    return [
        objective_value(name, row, lam, None if rewards is None else rewards[i])
        for i, row in enumerate(members_matrix)
    ]


def _matrix_values(name: str, m: Any, lam: float) -> Any:
    tensor = _is_tensor(m)
    if m.ndim != 2 or m.shape[1] == 0:
        raise ValueError(f"need a (samples x members) matrix, got shape {tuple(m.shape)}")
    if name == "mean":
        return m.mean(axis=1)  # torch takes numpy's axis= too
    if name == "worst_case":
        return m.amin(axis=1) if tensor else m.min(axis=1)
    # population variance: torch's correction=0, numpy's default ddof=0
    var = m.var(axis=1, correction=0) if tensor else m.var(axis=1)
    return m.mean(axis=1) - lam * var


def _is_tensor(x: Any) -> bool:
    # torch is never imported here: numpy callers need not load it
    return type(x).__module__.startswith("torch") and hasattr(x, "amin")
