"""The client's retry policy: which errors are retried, how long it waits, when it gives up."""

from __future__ import annotations

import random
import time

import pytest

from rewardserve.client import (
    InvalidArgument,
    ResourceExhausted,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)

FAR = time.monotonic() + 3600


def policy(**kw: object) -> RetryPolicy:
    return RetryPolicy(rng=random.Random(0), **kw)  # type: ignore[arg-type]


def test_backoff_doubles_up_to_its_cap_without_jitter() -> None:
    p = policy(max_attempts=10, initial_backoff_s=0.1, max_backoff_s=0.5, jitter=0.0)
    waits = [p.delay(Unavailable("down"), attempt, FAR) for attempt in range(1, 7)]
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5, 0.5])


def test_jitter_stretches_within_its_bound() -> None:
    p = policy(max_attempts=1000, initial_backoff_s=1.0, max_backoff_s=1.0, jitter=0.2)
    waits = [p.delay(Unavailable("down"), 1, FAR) for _ in range(500)]
    assert all(1.0 <= w <= 1.2 for w in waits)
    assert max(waits) - min(waits) > 0.1  # it does vary


def test_retry_after_is_a_floor() -> None:
    p = policy(initial_backoff_s=0.1, jitter=0.0)
    assert p.delay(ResourceExhausted("busy", retry_after=2.0), 1, FAR) == 2.0
    assert p.delay(ResourceExhausted("busy", retry_after=0.0), 1, FAR) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("err", "retried"),
    [
        (Unavailable("down"), True),
        (ResourceExhausted("overloaded", retry_after=1.0), True),
        (ResourceExhausted("request too large"), False),  # no retry-after: retrying won't help
        (InvalidArgument("bad", field="items.0.text"), False),
        (Unauthenticated("no key", field="authorization"), False),
    ],
)
def test_what_is_retried(err, retried) -> None:
    assert (policy().delay(err, 1, FAR) is not None) == retried


def test_gives_up_at_max_attempts_and_before_a_wait_past_the_deadline() -> None:
    p = policy(max_attempts=3, jitter=0.0)
    assert p.delay(Unavailable("down"), 2, FAR) is not None
    assert p.delay(Unavailable("down"), 3, FAR) is None
    soon = time.monotonic() + 1.0
    assert p.delay(ResourceExhausted("busy", retry_after=5.0), 1, soon) is None


def test_at_least_one_attempt() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
