"""The evaluation's numbers from rewards alone (no model, no I/O), so each is testable on
hand-made values whose answer is known."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rewardserve.schemas.evaluation import Accuracy, Calibration, CalibrationBin

Z_95 = 1.959963984540054
"""The standard normal's 97.5 % quantile."""
CALIBRATION_BINS = 10


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for a proportion. Chosen over the normal approximation
    because it keeps close to its nominal coverage at the small n and the accuracies near
    0 or 1 an evaluation meets, and never leaves [0, 1]; over a bootstrap because pairs are
    independent trials here (a bootstrap would only add noise and a seed). `successes` may
    be fractional (a tie counts half)."""
    if n <= 0:
        raise ValueError("an interval needs at least one trial")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def wins(margins: Sequence[float]) -> np.ndarray:
    """1 where chosen scored above rejected, 0 below, 0.5 on a tie."""
    m = np.asarray(margins, dtype=np.float64)
    return np.where(m > 0, 1.0, np.where(m < 0, 0.0, 0.5))


def accuracy(margins: Sequence[float]) -> Accuracy:
    """Pairwise accuracy of reward(chosen) − reward(rejected) margins, with its interval."""
    n = len(margins)
    if n == 0:
        return Accuracy(value=None, ci_low=None, ci_high=None, n=0)
    k = float(wins(margins).sum())
    low, high = wilson_interval(k, n)
    return Accuracy(value=k / n, ci_low=low, ci_high=high, n=n)


def sigmoid(x: np.ndarray) -> np.ndarray:
    # the two branches keep exp from overflowing for margins of either sign
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def calibration(margins: Sequence[float], n_bins: int = CALIBRATION_BINS) -> Calibration:
    """ECE and reliability bins of p = σ(margin), each pair entered on both sides (p with
    outcome 1, 1 − p with outcome 0): see schemas.evaluation.Calibration."""
    m = np.asarray(margins, dtype=np.float64)
    if m.size == 0:
        raise ValueError("calibration needs at least one pair")
    p = sigmoid(m)
    predicted = np.concatenate([p, 1.0 - p])
    outcome = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    # bin i holds [i/n, (i+1)/n); 1.0 goes into the last bin
    index = np.minimum((predicted * n_bins).astype(int), n_bins - 1)
    bins, ece = [], 0.0
    for i in range(n_bins):
        sel = index == i
        count = int(sel.sum())
        mean_p = float(predicted[sel].mean()) if count else None
        observed = float(outcome[sel].mean()) if count else None
        if count:
            assert mean_p is not None and observed is not None
            ece += count / predicted.size * abs(observed - mean_p)
        edges = {"lower": i / n_bins, "upper": (i + 1) / n_bins}
        bins.append(CalibrationBin(**edges, count=count, mean_predicted=mean_p, observed=observed))
    # −log σ(m) = log(1 + e^−m), computed stably
    log_loss = float(np.mean(np.logaddexp(0.0, -m)))
    return Calibration(ece=ece, log_loss=log_loss, bins=bins)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, tied values sharing their mean rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r; None when either side is constant (or fewer than 2 values)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson's r of the ranks."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 2:
        return None
    return pearson(_ranks(a), _ranks(b))


def median_split(
    margins: Sequence[float], uncertainty: Sequence[float]
) -> tuple[Accuracy, Accuracy]:
    """(accuracy on the more-confident half, on the less-confident half): pairs ordered by
    uncertainty (ties in file order), the lower floor(n/2) against the rest."""
    if len(margins) != len(uncertainty):
        raise ValueError(f"{len(margins)} margins for {len(uncertainty)} uncertainties")
    order = np.argsort(np.asarray(uncertainty, dtype=np.float64), kind="stable")
    half = len(order) // 2
    m = np.asarray(margins, dtype=np.float64)
    return accuracy(m[order[:half]].tolist()), accuracy(m[order[half:]].tolist())
