"""Pairwise accuracy with an interval that respects the pairs' grouping.

Pairs of one conversation are correlated (a model that gets one right tends to get its
siblings right), so treating them as independent draws (a Wilson or normal interval over
pairs) makes the interval too narrow. A cluster bootstrap resamples whole groups instead:
each resample draws as many groups as there are, with replacement, and pools their pairs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def cluster_bootstrap_interval(
    correct: Sequence[bool],
    groups: Sequence[Hashable],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile interval of the pooled accuracy over `resamples` group resamples (seeded:
    the same inputs give the same interval). (nan, nan) for no pairs."""
    if len(correct) != len(groups):
        raise ValueError(f"{len(correct)} outcomes for {len(groups)} group labels")
    if not correct:
        return float("nan"), float("nan")
    ids: dict[Hashable, int] = {}
    index = np.fromiter((ids.setdefault(g, len(ids)) for g in groups), dtype=np.int64)
    hits = np.bincount(index, weights=np.asarray(correct, dtype=np.float64), minlength=len(ids))
    sizes = np.bincount(index, minlength=len(ids)).astype(np.float64)
    n_groups = len(ids)
    rng = np.random.default_rng(seed)
    # how often each group is drawn in each resample: the same as drawing group indices
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=resamples)
    accuracies = (counts @ hits) / (counts @ sizes)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(accuracies, [tail, 1.0 - tail])
    return float(low), float(high)


def accuracy_summary(
    correct: Sequence[bool],
    groups: Sequence[Hashable],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """{"accuracy", "interval": [low, high], "pairs", "groups", "method"}: the report's form."""
    low, high = cluster_bootstrap_interval(correct, groups, resamples=resamples, seed=seed)
    return {
        "accuracy": sum(map(bool, correct)) / len(correct) if correct else float("nan"),
        "interval": [low, high],
        "pairs": len(correct),
        "groups": len(set(groups)),
        "method": f"{CONFIDENCE:.0%} cluster bootstrap over conversation groups, "
        f"{resamples} resamples, seed {seed}",
    }
