"""Scoring preference pairs in batches through any score function (the engine in process,
or a service's gRPC Score), and the whole evaluation of one data file."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rewardserve.evaluation.report import ScoredPair, build_evaluation
from rewardserve.schemas.evaluation import Dataset, Evaluation
from rewardserve.training.reward.data import PreferencePair, load_pairs, split_pairs

DEFAULT_BATCH_ITEMS = 32
ScoreFn = Callable[[list[str]], Awaitable[Sequence[Any]]]
"""Texts -> their ScoreResults in order (each with `reward`, and `members` for an ensemble)."""
OnBatch = Callable[[int, int, int], None]
"""(batch done, batches in all, pairs scored so far)."""


def pairs_per_batch(batch_items: int) -> int:
    """A batch holds whole pairs (chosen and rejected side by side)."""
    return max(1, batch_items // 2)


def batch_count(n_pairs: int, batch_items: int) -> int:
    return math.ceil(n_pairs / pairs_per_batch(batch_items))


def _members(result: Any) -> list[float] | None:
    # read with getattr: results gain `members` with ensembles; a single model has none
    members = getattr(result, "members", None)
    return list(members) if members else None


async def score_pairs(
    pairs: Sequence[PreferencePair],
    score: ScoreFn,
    batch_items: int = DEFAULT_BATCH_ITEMS,
    on_batch: OnBatch | None = None,
) -> list[ScoredPair]:
    per = pairs_per_batch(batch_items)
    total = batch_count(len(pairs), batch_items)
    out: list[ScoredPair] = []
    for b in range(total):
        chunk = pairs[b * per : (b + 1) * per]
        texts = [t for p in chunk for t in (p.chosen, p.rejected)]
        results = list(await score(texts))
        if len(results) != len(texts):
            raise RuntimeError(f"{len(texts)} texts scored, {len(results)} results")
        for c, r in zip(results[0::2], results[1::2], strict=True):
            out.append(ScoredPair(c.reward, r.reward, _members(c), _members(r)))
        if on_batch is not None:
            on_batch(b + 1, total, len(out))
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_pairs(
    path: Path, max_pairs: int | None, held_out: HeldOut | None = None
) -> list[PreferencePair]:
    """The file's pairs, or only the grouped held-out split `held_out` names, its first
    `max_pairs` when capped (file order: the same file and cap always give the same pairs).
    Raises PairDataError for a file that cannot be used."""
    pairs = load_pairs(path)
    if held_out is not None:
        _, pairs = split_pairs(pairs, held_out.fraction, held_out.seed)
    return pairs[:max_pairs] if max_pairs is not None else pairs


@dataclass(frozen=True)
class HeldOut:
    """The pairs `train-rm --eval-fraction <fraction> --seed <seed>` held out of training
    (whole conversations: rewardserve.training.reward.data.split_pairs)."""

    fraction: float
    seed: int

    def describe(self) -> str:
        return (
            f"grouped held-out split {self.fraction:g} of seed {self.seed} "
            f"(train-rm --eval-fraction {self.fraction:g} --seed {self.seed})"
        )


async def evaluate(
    model: str,
    path: Path,
    score: ScoreFn,
    *,
    max_pairs: int | None = None,
    batch_items: int = DEFAULT_BATCH_ITEMS,
    on_batch: OnBatch | None = None,
    pairs: Sequence[PreferencePair] | None = None,
    held_out: HeldOut | None = None,
) -> Evaluation:
    """Score the file's pairs with `score` (the model `model`) and measure them. `pairs`:
    the file's pairs when the caller already read them (read_pairs)."""
    start = time.perf_counter()
    path = Path(path)
    dataset = Dataset(
        name=path.name,
        path=str(path.resolve()),
        sha256=file_sha256(path),
        split=None if held_out is None else held_out.describe(),
    )
    if pairs is None:
        pairs = read_pairs(path, max_pairs, held_out)
    scored = await score_pairs(pairs, score, batch_items, on_batch)
    return build_evaluation(
        model, dataset, pairs, scored,
        evaluated_at=datetime.now(UTC), seconds=time.perf_counter() - start,
    )  # fmt: skip
