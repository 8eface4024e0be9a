"""Preference pairs from JSON Lines: loading, validation and the train/eval split."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Sequence
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


def split_pairs(
    pairs: Sequence[PreferencePair],
    eval_fraction: float,
    seed: int,
    max_pairs: int | None = None,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, eval): a seeded shuffle, optionally capped at `max_pairs`, then split.

    The same file, fraction and seed always give the same split. With a non-zero fraction at
    least one pair is held out, and at least one is always left to train on.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    if max_pairs is not None:
        order = order[:max_pairs]
    n_eval = round(len(order) * eval_fraction)
    if eval_fraction > 0:
        n_eval = max(n_eval, 1)
    n_eval = min(n_eval, len(order) - 1)
    if not order:
        raise PairDataError("no pairs to train on")
    held_out = [pairs[i] for i in order[:n_eval]]
    train = [pairs[i] for i in order[n_eval:]]
    return train, held_out
