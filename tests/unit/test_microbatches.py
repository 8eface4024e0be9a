"""plan_microbatches: an optimal split of waiting items into length-homogeneous forwards."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import pytest

from rewardserve.engine.batcher import FORWARD_OVERHEAD_TOKENS, BatchLimits, plan_microbatches

MICROBATCH_MAX_TOKENS = BatchLimits().max_batch_tokens


def cost(lengths: Sequence[int], groups: Sequence[Sequence[int]], overhead: int) -> int:
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def feasible(
    lengths: Sequence[int],
    groups: Sequence[Sequence[int]],
    max_tokens: int,
    max_rows: int | None = None,
) -> bool:
    return all(
        len(g) == 1
        or (len(g) * max(lengths[i] for i in g) <= max_tokens and len(g) <= (max_rows or len(g)))
        for g in groups
    )


def set_partitions(items: list[int]) -> Iterator[list[list[int]]]:
    """Every partition of `items` into non-empty groups (Bell(n) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        yield [[first], *part]
        for k in range(len(part)):
            yield [*part[:k], [first, *part[k]], *part[k + 1 :]]


def check_structure(lengths: Sequence[int], groups: list[list[int]], max_tokens: int) -> None:
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(lengths))), "not a partition of the indices"
    assert all(groups), "empty group"
    # contiguous in length-sorted order: lengths never decrease across the concatenation
    seq = [lengths[i] for i in flat]
    assert seq == sorted(seq), groups
    assert feasible(lengths, groups, max_tokens), groups


@pytest.mark.parametrize(
    "lengths",
    [[], [7], [5, 5, 5], [3, 200, 4, 180, 5], [512] * 12, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]],
)
def test_partition_of_all_indices(lengths: list[int]) -> None:
    groups = plan_microbatches(lengths)
    check_structure(lengths, groups, MICROBATCH_MAX_TOKENS)
    if not lengths:
        assert groups == []


def test_equal_lengths_go_in_one_forward() -> None:
    assert plan_microbatches([10, 10, 10, 10]) == [[0, 1, 2, 3]]


def test_very_different_lengths_are_split_and_short_ones_come_first() -> None:
    lengths = [500, 3, 480, 4, 2]
    groups = plan_microbatches(lengths)
    assert groups == [[4, 1, 3], [2, 0]]


def test_max_tokens_caps_a_microbatch() -> None:
    lengths = [100] * 10
    groups = plan_microbatches(lengths, overhead_tokens=1000, max_tokens=300)
    assert all(len(g) <= 3 for g in groups)
    check_structure(lengths, groups, 300)
    assert len(groups) == 4


def test_a_single_item_over_max_tokens_is_still_planned() -> None:
    groups = plan_microbatches([10_000, 5], max_tokens=4096)
    check_structure([10_000, 5], groups, 4096)
    assert [0] in groups


def test_never_worse_than_one_batch_or_all_singletons() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        n = rng.randint(1, 40)
        lengths = [rng.choice([rng.randint(1, 16), rng.randint(1, 512)]) for _ in range(n)]
        overhead = rng.choice([0, 1, FORWARD_OVERHEAD_TOKENS, 1000])
        max_tokens = rng.choice([MICROBATCH_MAX_TOKENS, 512, 10**9])
        groups = plan_microbatches(lengths, overhead, max_tokens)
        check_structure(lengths, groups, max_tokens)
        got = cost(lengths, groups, overhead)
        singletons = [[i] for i in range(n)]
        assert got <= cost(lengths, singletons, overhead)
        one = [list(range(n))]
        if feasible(lengths, one, max_tokens):
            assert got <= cost(lengths, one, overhead)


def test_optimal_against_brute_force_over_all_partitions() -> None:
    # The optimum over *all* set partitions (not only contiguous ones) must be reached.
    rng = random.Random(99)
    for _ in range(150):
        n = rng.randint(1, 7)
        lengths = [rng.randint(1, 64) for _ in range(n)]
        overhead = rng.choice([0, 5, 20, 96])
        max_tokens = rng.choice([64, 128, 4096])
        max_rows = rng.choice([None, 1, 2, 3])
        groups = plan_microbatches(lengths, overhead, max_tokens, max_rows)
        check_structure(lengths, groups, max_tokens)
        assert feasible(lengths, groups, max_tokens, max_rows)
        best = min(
            cost(lengths, p, overhead)
            for p in set_partitions(list(range(n)))
            if feasible(lengths, p, max_tokens, max_rows)
        )
        assert cost(lengths, groups, overhead) == best, (lengths, max_rows, groups)


def test_max_rows_caps_a_microbatch() -> None:
    groups = plan_microbatches([10] * 10, overhead_tokens=1000, max_rows=4)
    assert sorted(map(len, groups)) == [2, 4, 4]


def test_zero_overhead_pays_no_padding() -> None:
    lengths = [9, 1, 5, 5, 3]
    groups = plan_microbatches(lengths, overhead_tokens=0)
    assert cost(lengths, groups, 0) == sum(lengths)
