"""Preference pairs from JSON Lines: loading, validation, grouping by conversation, and the
grouped train/eval split and cross-validation folds.

Pairs of one conversation are correlated (HH-RLHF forks a conversation after its first turn,
so several pairs share their opening question): a split that puts one in training and its
sibling in evaluation measures memory, not generalisation. Every split here is by group."""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

GZIP_MAGIC = b"\x1f\x8b"
FIELDS = ("chosen", "rejected")


class PairDataError(ValueError):
    """A preference file that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True, slots=True)
class PreferencePair:
    chosen: str
    rejected: str


def _open_text(path: Path) -> IO[str]:
    # Sniff the magic bytes rather than trust the suffix: a renamed or mislabeled file
    # still reads, and a plain file called .gz gives a clear error instead of garbage.
    with path.open("rb") as raw:
        compressed = raw.read(2) == GZIP_MAGIC
    if compressed:
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _parse_line(path: Path, number: int, line: str) -> PreferencePair:
    where = f"{path}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PairDataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise PairDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in FIELDS:
        if field not in row:
            raise PairDataError(f"{where}: missing field '{field}'")
        value = row[field]
        if not isinstance(value, str):
            raise PairDataError(
                f"{where}: field '{field}' must be a string, got {type(value).__name__}"
            )
        if not value.strip():
            raise PairDataError(f"{where}: field '{field}' is empty")
    return PreferencePair(chosen=row["chosen"], rejected=row["rejected"])


def load_pairs(path: Path) -> list[PreferencePair]:
    """All pairs of a .jsonl or .jsonl.gz file; blank lines are skipped.

    Raises PairDataError naming the line and field of the first bad record.
    """
    path = Path(path)
    if not path.is_file():
        raise PairDataError(f"{path}: no such file")
    pairs: list[PreferencePair] = []
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    pairs.append(_parse_line(path, number, line))
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise PairDataError(f"{path}: cannot be read as UTF-8 JSON Lines ({exc})") from None
    if not pairs:
        raise PairDataError(f"{path}: no preference pairs in the file")
    return pairs


_FIRST_HUMAN = re.compile(r"Human:(.*?)(?:\n\nAssistant:|$)", re.DOTALL)


def group_key(pair: PreferencePair) -> str:
    """The conversation a pair belongs to: its first Human turn, whitespace-normalised and
    case-folded. Chosen and rejected share everything up to their last reply, and the pairs
    HH-RLHF forks from one conversation share at least their first turn; grouping by it keeps
    related pairs together (a generic opener like "hi" groups unrelated ones too, which only
    errs on the safe side). Text with no Human turn is its own group (its whole prompt)."""
    match = _FIRST_HUMAN.search(pair.chosen)
    if match is None:
        cut = pair.chosen.rfind("\n\nAssistant:")
        text = pair.chosen[:cut] if cut > 0 else pair.chosen
    else:
        text = match.group(1)
    return " ".join(text.split()).casefold()


def pair_groups(pairs: Sequence[PreferencePair]) -> list[int]:
    """Each pair's group as a small integer (numbered in order of first appearance)."""
    ids: dict[str, int] = {}
    return [ids.setdefault(group_key(p), len(ids)) for p in pairs]


def _members(groups: Sequence[Hashable], indices: Sequence[int]) -> dict[Hashable, list[int]]:
    out: dict[Hashable, list[int]] = {}
    for i in indices:
        out.setdefault(groups[i], []).append(i)
    return out


def capped_indices(n: int, seed: int, max_pairs: int | None) -> list[int]:
    """Indices of the pairs a run uses: all of them, or a seeded random `max_pairs` of them."""
    order = list(range(n))
    if max_pairs is not None and max_pairs < n:
        order = sorted(random.Random(seed).sample(order, max_pairs))
    return order


def grouped_split(
    groups: Sequence[Hashable], indices: Sequence[int], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train, held-out) indices from `indices`, whole groups on either side.

    Groups are shuffled (seeded) and taken into the held-out side while they fit in
    round(len x fraction) pairs, so with small groups the held-out share is exact. With a
    non-zero fraction at least one group is held out when there are two or more groups, and
    at least one is always left to train on. Both sides keep the shuffled group order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {fraction}")
    if not indices:
        raise PairDataError("no pairs to train on")
    members = _members(groups, indices)
    order = list(members)
    random.Random(seed).shuffle(order)
    target = round(len(indices) * fraction)
    held_groups: list[Hashable] = []
    size = 0
    for g in order[:-1]:  # the last group always trains
        if size + len(members[g]) <= target:
            held_groups.append(g)
            size += len(members[g])
    if fraction > 0 and not held_groups and len(order) > 1:
        held_groups.append(min(order[:-1], key=lambda g: len(members[g])))
    held_set = set(held_groups)
    held = [i for g in held_groups for i in members[g]]
    train = [i for g in order if g not in held_set for i in members[g]]
    return train, held


def grouped_folds(
    groups: Sequence[Hashable], indices: Sequence[int], k: int, seed: int
) -> list[list[int]]:
    """`k` folds partitioning `indices`, whole groups in each, of near-equal pair counts.

    Groups are shuffled (seeded), then placed largest first, each into the fold that has the
    fewest pairs so far (ties: the lowest fold), so the same groups, k and seed always give
    the same folds. PairDataError if there are fewer groups than folds.
    """
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    members = _members(groups, indices)
    if len(members) < k:
        raise PairDataError(
            f"{k} folds need at least {k} conversations (groups of pairs), the data has "
            f"{len(members)}"
        )
    order = list(members)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(members[g]))  # stable: the shuffle breaks ties
    folds: list[list[int]] = [[] for _ in range(k)]
    for g in order:
        smallest = min(range(k), key=lambda f: len(folds[f]))
        folds[smallest].extend(members[g])
    return folds


def bootstrap_indices(groups: Sequence[Hashable], indices: Sequence[int], seed: int) -> list[int]:
    """A bootstrap resample of `indices` by group: as many groups as there are, drawn with
    replacement (seeded), each bringing all its pairs. About 63 % of the groups appear, some
    more than once; a drawn group's pairs stay together, as in every split here."""
    members = _members(groups, indices)
    keys = list(members)
    rng = random.Random(seed)
    return [i for _ in keys for i in members[keys[rng.randrange(len(keys))]]]


def split_indices(
    pairs: Sequence[PreferencePair],
    eval_fraction: float,
    seed: int,
    max_pairs: int | None = None,
) -> tuple[list[int], list[int]]:
    """(train, held-out) indices into `pairs`: the capped subset, split by group."""
    used = capped_indices(len(pairs), seed, max_pairs)
    return grouped_split(pair_groups(pairs), used, eval_fraction, seed)


def split_pairs(
    pairs: Sequence[PreferencePair],
    eval_fraction: float,
    seed: int,
    max_pairs: int | None = None,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, eval): optionally a seeded subset of `max_pairs`, then a grouped split
    (grouped_split): no conversation has pairs on both sides.

    The same file, fraction and seed always give the same split.
    """
    train, held = split_indices(pairs, eval_fraction, seed, max_pairs)
    return [pairs[i] for i in train], [pairs[i] for i in held]
