"""Choosing among scored candidates: argmax Best-of-N and soft Best-of-N.

Pure functions over rewards, so their statistics can be tested exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def kl_bound(n: int) -> float:
    """Upper bound on KL(Best-of-n policy || base policy): log n - (n - 1)/n (Stiennon et
    al. 2020; tight for argmax selection over distinct outcomes)."""
    return math.log(n) - (n - 1) / n


def reported_kl_bound(n: int, selection: str, strategy: str) -> tuple[float | None, str | None]:
    """(kl_bound, why it is absent): the bound is proved for argmax over n full samples only.
    Soft selection picks below the maximum, and speculative rejection chooses among
    survivors of partial-text rounds, so neither is Best-of-n in the bound's sense."""
    if strategy == "speculative":
        return None, "speculative rejection: not argmax over n full samples, so no bound"
    if selection != "argmax":
        return None, "soft selection: the bound holds for argmax selection only"
    return kl_bound(n), None


def argmax(rewards: Sequence[float]) -> int:
    """Index of the highest reward; the earliest among ties (sample order, so reproducible)."""
    return max(range(len(rewards)), key=lambda i: (rewards[i], -i))


def soft_weights(rewards: Sequence[float], lam: float) -> list[float]:
    """Probabilities proportional to exp(r_i / lam), computed stably."""
    top = max(rewards)
    w = [math.exp((r - top) / lam) for r in rewards]
    total = sum(w)
    return [x / total for x in w]


def soft(rewards: Sequence[float], lam: float, rng: random.Random) -> int:
    """Sample index i with probability proportional to exp(r_i / lam).

    lam -> 0 approaches argmax; lam -> infinity approaches a uniform pick among the
    candidates, i.e. one plain sample of the base policy.
    """
    return rng.choices(range(len(rewards)), weights=soft_weights(rewards, lam))[0]


def select(rewards: Sequence[float], method: str, lam: float = 1.0, seed: int | None = None) -> int:
    if method == "argmax":
        return argmax(rewards)
    return soft(rewards, lam, random.Random(seed))
