"""Ensemble objectives (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
Overoptimization"), over the members' rewards of one sample.

- mean: the members' mean.
- worst_case: the lowest member (a conservative estimate).
- uncertainty_weighted: mean - lam * variance across members.

The variance (and `std`, the `uncertainty` the service reports) is the population one, 1/k
over k members, as Coste et al. write it: so uncertainty_weighted = mean - lam * std**2, and a
one-member "ensemble" has variance 0. With one member every objective is that member's reward
exactly, which is how a single reward model reduces to its plain reward.

Serving (Best-of-N, rerank) uses `objective_value`; PPO scores whole batches with
`objective_values` over a (samples x members) matrix, numpy or torch alike.
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


def objective_value(name: str, members: Sequence[float], lam: float = 1.0) -> float:
    """The objective `name` of one sample's member rewards."""
    _check(name, lam)
    if not members:
        raise ValueError("an objective needs at least one member reward")
    if len(members) == 1:  # exactly the one reward, whatever the objective (no 0*lam rounding)
        return float(members[0])
    if name == "mean":
        return mean(members)
    if name == "worst_case":
        return float(min(members))
    return mean(members) - lam * variance(members)


def objective_values(name: str, members_matrix: Any, lam: float = 1.0) -> Any:
    """The objective of each row (a sample) of a (samples x members) matrix; a torch tensor
    in gives a tensor out (same device and dtype), anything else a numpy array."""
    _check(name, lam)
    tensor = _is_tensor(members_matrix)
    m = members_matrix if tensor else np.asarray(members_matrix, dtype=float)
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
