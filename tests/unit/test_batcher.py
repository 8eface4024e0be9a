"""The batcher: forward planning (`next_batch`) and the per-model `Batcher` loop.

The forward functions here are plain Python over token ids (reward = sum of the ids), run in
a real ThreadPoolExecutor exactly as the engine runs the model's forward.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from rewardserve.engine import batcher as batcher_module
from rewardserve.engine.batcher import Batcher, BatchLimits, Pending, next_batch
from rewardserve.engine.inputs import Encoded
from rewardserve.schemas.errors import (
    DeadlineExceeded,
    InvalidArgument,
    Overloaded,
    Unavailable,
)

FAR = 1e12  # a deadline that never passes


def enc(*ids: int) -> Encoded:
    return Encoded(list(ids), truncated=False)


def sized(n: int, tag: int = 1) -> Encoded:
    """An item of n tokens whose ids all equal `tag` (so its reward is n * tag)."""
    return Encoded([tag] * n, truncated=False)


def reward_of(e: Encoded) -> float:
    return float(sum(e.input_ids))


# ---- next_batch -------------------------------------------------------------------------


def make_queue(loop: asyncio.AbstractEventLoop, items: Sequence[tuple[Encoded, float]]):
    return deque(Pending(item, deadline, loop.create_future()) for item, deadline in items)


def tags(batch: Sequence[Pending]) -> list[int]:
    return [p.item.input_ids[0] for p in batch]


async def test_equal_items_go_fifo_within_the_token_budget() -> None:
    loop = asyncio.get_running_loop()
    q = make_queue(loop, [(sized(3, tag=i), FAR) for i in range(1, 6)])
    limits = BatchLimits(max_batch_tokens=7, max_batch_size=64)
    assert tags(next_batch(q, limits, now=0.0)) == [1, 2]  # 2 x 3 <= 7 < 3 x 3
    assert tags(next_batch(q, limits, now=0.0)) == [3, 4]
    assert tags(next_batch(q, limits, now=0.0)) == [5]
    assert next_batch(q, limits, now=0.0) == []


async def test_exact_budget_fits() -> None:
    loop = asyncio.get_running_loop()
    q = make_queue(loop, [(sized(4, tag=1), FAR), (sized(4, tag=2), FAR)])
    assert tags(next_batch(q, BatchLimits(max_batch_tokens=8), now=0.0)) == [1, 2]


async def test_the_oldest_item_gets_the_companions_of_its_length() -> None:
    loop = asyncio.get_running_loop()
    lengths = [(100, 1), (5, 2), (100, 3), (5, 4)]
    q = make_queue(loop, [(sized(n, tag=t), FAR) for n, t in lengths])
    batch = next_batch(q, BatchLimits(), now=0.0)
    assert tags(batch) == [1, 3]  # the two long ones: padding the short ones to 100 costs more
    assert tags(q) == [2, 4]  # the rest stay queued, in arrival order
    assert tags(next_batch(q, BatchLimits(), now=0.0)) == [2, 4]


async def test_the_oldest_item_never_starves_behind_better_packing_newcomers() -> None:
    loop = asyncio.get_running_loop()
    q = make_queue(loop, [(sized(200, tag=9), FAR)] + [(sized(4, tag=1), FAR)] * 40)
    assert 9 in tags(next_batch(q, BatchLimits(), now=0.0))


async def test_rows_of_one_forward_respect_max_batch_size() -> None:
    loop = asyncio.get_running_loop()
    q = make_queue(loop, [(sized(1, tag=i), FAR) for i in range(1, 11)])
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=3)
    sizes = []
    while q:
        sizes.append(tags(next_batch(q, limits, now=0.0)))
    assert sizes == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]


async def test_the_oldest_item_is_taken_alone_when_over_budget() -> None:
    loop = asyncio.get_running_loop()
    q = make_queue(loop, [(sized(20), FAR), (sized(1), FAR)])
    limits = BatchLimits(max_batch_tokens=10)
    assert [len(p.item) for p in next_batch(q, limits, now=0.0)] == [20]
    assert [len(p.item) for p in next_batch(q, limits, now=0.0)] == [1]


async def test_cancelled_items_are_skipped_and_take_no_rows() -> None:
    loop = asyncio.get_running_loop()
    q = make_queue(loop, [(sized(1, tag=i), FAR) for i in range(1, 5)])
    q[0].future.cancel()
    q[1].future.cancel()
    batch = next_batch(q, BatchLimits(max_batch_tokens=10_000, max_batch_size=2), now=0.0)
    assert tags(batch) == [3, 4]
    assert not q


async def test_already_answered_items_are_skipped() -> None:
    loop = asyncio.get_running_loop()
    q = make_queue(loop, [(sized(1, tag=1), FAR), (sized(1, tag=2), FAR)])
    q[0].future.set_result(0.0)
    assert tags(next_batch(q, BatchLimits(), now=0.0)) == [2]


async def test_expired_items_fail_with_deadline_exceeded() -> None:
    loop = asyncio.get_running_loop()
    q = make_queue(loop, [(sized(1, tag=1), 10.0), (sized(1, tag=2), FAR)])
    expired = q[0]
    batch = next_batch(q, BatchLimits(), now=10.0)  # deadline == now counts as passed
    assert tags(batch) == [2]
    assert isinstance(expired.future.exception(), DeadlineExceeded)


async def test_expired_items_do_not_use_the_budget() -> None:
    loop = asyncio.get_running_loop()
    q = make_queue(loop, [(sized(9), 1.0), (sized(4), FAR), (sized(4), FAR)])
    batch = next_batch(q, BatchLimits(max_batch_tokens=8), now=2.0)
    assert [len(p.item) for p in batch] == [4, 4]
    assert not q


# ---- Batcher ------------------------------------------------------------------------------


class RecordingForward:
    """A forward that records what it was given; optionally blocks until released."""

    def __init__(self, *, block: bool = False, poison: int | None = None) -> None:
        self.calls: list[list[list[int]]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not block:
            self.release.set()
        self.poison = poison
        self._lock = threading.Lock()

    def __call__(self, batch: Sequence[Encoded]) -> list[float]:
        with self._lock:
            self.calls.append([list(e.input_ids) for e in batch])
        self.started.set()
        if not self.release.wait(timeout=10):
            raise RuntimeError("test forward was never released")
        if self.poison is not None and any(self.poison in e.input_ids for e in batch):
            raise ValueError("poisoned batch")
        return [reward_of(e) for e in batch]

    @property
    def seen(self) -> list[list[int]]:
        return [ids for call in self.calls for ids in call]

    @property
    def batch_sizes(self) -> list[int]:
        return [len(c) for c in self.calls]


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-forward")
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def make_batcher(
    forward, executor, *, max_restarts: int = 3, restart_backoff_s: float = 0.0, **limits
) -> Batcher:
    b = Batcher(
        "test",
        forward,
        executor,
        BatchLimits(**limits),
        max_restarts=max_restarts,
        restart_backoff_s=restart_backoff_s,
    )
    b.start()
    return b


def later(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


async def wait_started(fwd: RecordingForward) -> None:
    assert await asyncio.to_thread(fwd.started.wait, 5), "forward never started"


async def test_results_come_back_in_request_order(executor) -> None:
    fwd = RecordingForward()
    b = make_batcher(fwd, executor)
    try:
        items = [enc(5), enc(1, 2, 3), enc(7, 7), enc(2)]
        assert await b.submit(items, later()) == [5.0, 6.0, 14.0, 2.0]
    finally:
        await b.close()


async def test_concurrent_requests_are_batched_together(executor) -> None:
    fwd = RecordingForward()
    b = make_batcher(fwd, executor, max_wait_s=0.05, max_batch_size=64)
    try:
        requests = [[enc(10 * r + i) for i in range(3)] for r in range(6)]
        results = await asyncio.gather(*(b.submit(req, later()) for req in requests))
        for req, res in zip(requests, results, strict=True):
            assert res == [reward_of(e) for e in req]  # each caller gets its own results
        assert sum(fwd.batch_sizes) == 18
        assert len(fwd.calls) < len(requests), fwd.batch_sizes
        assert max(fwd.batch_sizes) > 3, fwd.batch_sizes  # items of several requests in one
    finally:
        await b.close()


async def test_each_forward_answers_its_callers_before_the_next_one_runs(executor) -> None:
    """Short and long items queued together run as two forwards; the short ones' caller is
    answered while the long forward is still running."""
    occupy, long_gate = threading.Event(), threading.Event()

    def forward(batch: Sequence[Encoded]) -> list[float]:
        if batch[0].input_ids[0] == 7:
            assert occupy.wait(10)
        if any(len(e) > 100 for e in batch):
            assert long_gate.wait(10)
        return [reward_of(e) for e in batch]

    b = make_batcher(forward, executor, max_wait_s=0)
    try:
        busy = asyncio.create_task(b.submit([enc(7)], later()))
        await asyncio.sleep(0.05)  # the model is now busy with item 7
        short = asyncio.create_task(b.submit([sized(4, tag=2), sized(4, tag=3)], later()))
        long = asyncio.create_task(b.submit([sized(400, tag=1)], later()))
        await asyncio.sleep(0.05)
        occupy.set()
        assert await asyncio.wait_for(short, 5) == [8.0, 12.0]
        assert not long.done()  # its forward is still held
        long_gate.set()
        assert await asyncio.wait_for(long, 5) == [400.0]
        assert await busy == [7.0]
    finally:
        occupy.set()
        long_gate.set()
        await b.close()


async def test_batches_never_exceed_max_batch_size(executor) -> None:
    fwd = RecordingForward()
    b = make_batcher(fwd, executor, max_batch_size=4, max_wait_s=0.01)
    try:
        items = [enc(i) for i in range(1, 11)]
        assert await b.submit(items, later()) == [float(i) for i in range(1, 11)]
        assert fwd.batch_sizes == [4, 4, 2]
        assert fwd.seen == [[i] for i in range(1, 11)]  # FIFO across batches
    finally:
        await b.close()


async def test_batches_respect_token_budget(executor) -> None:
    fwd = RecordingForward()
    b = make_batcher(fwd, executor, max_batch_tokens=10, max_wait_s=0.01)
    try:
        items = [sized(4, tag=i) for i in range(1, 6)]
        await b.submit(items, later())
        assert fwd.batch_sizes == [2, 2, 1]
        assert all(sum(len(ids) for ids in call) <= 10 for call in fwd.calls)
    finally:
        await b.close()


async def test_admission_refuses_at_once_when_queue_would_overflow(executor) -> None:
    fwd = RecordingForward(block=True)
    b = make_batcher(fwd, executor, max_queue_items=4, max_wait_s=0)
    try:
        running = asyncio.create_task(b.submit([enc(1)], later()))
        await wait_started(fwd)  # item 1 is in the forward: the queue is empty again
        queued = asyncio.create_task(b.submit([enc(2), enc(3), enc(4)], later()))
        await asyncio.sleep(0.05)
        assert b.queued == 3
        started = time.monotonic()
        with pytest.raises(Overloaded) as info:
            await asyncio.wait_for(b.submit([enc(5), enc(6)], later()), timeout=2)
        assert time.monotonic() - started < 0.5  # refused at once, not after waiting
        assert info.value.retry_after_s >= 1
        assert info.value.http_status == 429
        assert b.queued == 3  # the refused request added nothing
        # exactly filling the queue is still allowed
        fits = asyncio.create_task(b.submit([enc(7)], later()))
        await asyncio.sleep(0.05)
        assert b.queued == 4
        fwd.release.set()
        assert await asyncio.wait_for(running, 5) == [1.0]
        assert await asyncio.wait_for(queued, 5) == [2.0, 3.0, 4.0]
        assert await asyncio.wait_for(fits, 5) == [7.0]
        assert [5] not in fwd.seen and [6] not in fwd.seen
        # and once drained, the same request is accepted
        assert await b.submit([enc(5), enc(6)], later()) == [5.0, 6.0]
    finally:
        fwd.release.set()
        await b.close()


async def test_a_request_larger_than_the_whole_queue_is_invalid_not_overloaded(
    executor,
) -> None:
    """Retrying could never make it fit, so it is a 400 naming the field, not a 429."""
    fwd = RecordingForward()
    b = make_batcher(fwd, executor, max_queue_items=3)
    try:
        with pytest.raises(InvalidArgument) as info:
            await b.submit([enc(1)] * 4, later())
        assert info.value.http_status == 400 and info.value.field == "items"
        assert "at most 3" in info.value.message
        assert fwd.calls == []
        assert await b.submit([enc(1)] * 3, later()) == [1.0] * 3  # the whole queue fits
    finally:
        await b.close()


async def test_cancelled_callers_items_are_never_forwarded(executor) -> None:
    fwd = RecordingForward(block=True)
    b = make_batcher(fwd, executor, max_wait_s=0)
    try:
        first = asyncio.create_task(b.submit([enc(1)], later()))
        await wait_started(fwd)
        gone = asyncio.create_task(b.submit([enc(666), enc(667)], later()))
        stays = asyncio.create_task(b.submit([enc(3)], later()))
        await asyncio.sleep(0.02)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        fwd.release.set()
        assert await asyncio.wait_for(first, 5) == [1.0]
        assert await asyncio.wait_for(stays, 5) == [3.0]
        assert [666] not in fwd.seen and [667] not in fwd.seen
        assert fwd.seen == [[1], [3]]
    finally:
        fwd.release.set()
        await b.close()


async def test_expired_items_get_deadline_exceeded_and_are_not_forwarded(executor) -> None:
    fwd = RecordingForward(block=True)
    b = make_batcher(fwd, executor, max_wait_s=0)
    try:
        first = asyncio.create_task(b.submit([enc(1)], later()))
        await wait_started(fwd)
        late = asyncio.create_task(b.submit([enc(555), enc(556)], time.monotonic() + 0.05))
        ok = asyncio.create_task(b.submit([enc(4)], later()))
        await asyncio.sleep(0.15)  # the deadline passes while the forward is busy
        fwd.release.set()
        with pytest.raises(DeadlineExceeded) as info:
            await asyncio.wait_for(late, 5)
        assert info.value.http_status == 504
        assert await asyncio.wait_for(first, 5) == [1.0]
        assert await asyncio.wait_for(ok, 5) == [4.0]
        assert [555] not in fwd.seen and [556] not in fwd.seen
    finally:
        fwd.release.set()
        await b.close()


async def test_a_deadline_already_passed_is_never_forwarded(executor) -> None:
    fwd = RecordingForward()
    b = make_batcher(fwd, executor)
    try:
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(b.submit([enc(9)], time.monotonic() - 1), 5)
        assert fwd.calls == []
        assert await b.submit([enc(2)], later()) == [2.0]
    finally:
        await b.close()


async def test_failed_forward_fails_its_batch_only_and_loop_keeps_serving(executor) -> None:
    fwd = RecordingForward(poison=13)
    b = make_batcher(fwd, executor, max_wait_s=0)
    try:
        with pytest.raises(ValueError, match="poisoned"):
            await b.submit([enc(1), enc(13)], later())
        assert await b.submit([enc(2), enc(3)], later()) == [2.0, 3.0]
        with pytest.raises(ValueError):
            await b.submit([enc(13)], later())
        assert await b.submit([enc(4)], later()) == [4.0]
    finally:
        await b.close()


async def test_failed_forward_does_not_fail_the_next_batch(executor) -> None:
    fwd = RecordingForward(block=True, poison=13)
    b = make_batcher(fwd, executor, max_wait_s=0)
    try:
        bad = asyncio.create_task(b.submit([enc(13)], later()))
        await wait_started(fwd)
        good = asyncio.create_task(b.submit([enc(5), enc(6)], later()))  # the next batch
        await asyncio.sleep(0.02)
        fwd.release.set()
        with pytest.raises(ValueError):
            await asyncio.wait_for(bad, 5)
        assert await asyncio.wait_for(good, 5) == [5.0, 6.0]
        assert fwd.batch_sizes == [1, 2]
    finally:
        fwd.release.set()
        await b.close()


async def test_close_fails_queued_items_with_unavailable(executor) -> None:
    fwd = RecordingForward(block=True)
    b = make_batcher(fwd, executor, max_wait_s=0)
    first = asyncio.create_task(b.submit([enc(1)], later()))
    try:
        await wait_started(fwd)
        queued = asyncio.create_task(b.submit([enc(2), enc(3)], later()))
        await asyncio.sleep(0.02)
        assert b.queued == 2
        await b.close()
        with pytest.raises(Unavailable) as info:
            await asyncio.wait_for(queued, 2)
        assert info.value.http_status == 503
        assert b.queued == 0
        with pytest.raises(Unavailable):
            await b.submit([enc(4)], later())
        assert [2] not in fwd.seen
    finally:
        fwd.release.set()
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)


async def test_close_answers_the_batch_that_is_in_the_forward(executor) -> None:
    fwd = RecordingForward(block=True)
    b = make_batcher(fwd, executor, max_wait_s=0)
    in_flight = asyncio.create_task(b.submit([enc(1)], later()))
    try:
        await wait_started(fwd)
        await b.close()
        fwd.release.set()
        # Either outcome is fine (the result, or Unavailable); hanging is not.
        try:
            result = await asyncio.wait_for(asyncio.shield(in_flight), 2)
        except Unavailable:
            result = None
        assert result in (None, [1.0])
    finally:
        fwd.release.set()
        in_flight.cancel()
        await asyncio.gather(in_flight, return_exceptions=True)


# ---- counting: only live items hold queue slots -------------------------------------------


async def test_cancelled_items_free_their_queue_slots(executor) -> None:
    fwd = RecordingForward(block=True)
    b = make_batcher(fwd, executor, max_queue_items=4, max_wait_s=0)
    try:
        running = asyncio.create_task(b.submit([enc(1)], later()))
        await wait_started(fwd)
        gone = asyncio.create_task(b.submit([enc(666)] * 3, later()))
        await asyncio.sleep(0.02)
        assert b.queued == 3
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert b.queued == 0
        assert b.dropped["cancelled"] == 3
        # Four live items fit a queue of four, though the cancelled three are still in it.
        fits = asyncio.create_task(b.submit([enc(2), enc(3), enc(4), enc(5)], later()))
        await asyncio.sleep(0.02)
        assert b.queued == 4
        fwd.release.set()
        assert await asyncio.wait_for(fits, 5) == [2.0, 3.0, 4.0, 5.0]
        assert await asyncio.wait_for(running, 5) == [1.0]
        assert [666] not in fwd.seen
    finally:
        fwd.release.set()
        await b.close()


async def test_expired_items_free_their_queue_slots_at_their_deadline(executor) -> None:
    fwd = RecordingForward(block=True)
    b = make_batcher(fwd, executor, max_queue_items=2, max_wait_s=0)
    try:
        running = asyncio.create_task(b.submit([enc(1)], later()))
        await wait_started(fwd)
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(b.submit([enc(7), enc(8)], time.monotonic() + 0.05), 5)
        assert b.queued == 0 and b.dropped["expired"] == 2
        fits = asyncio.create_task(b.submit([enc(2), enc(3)], later()))  # no false 429
        await asyncio.sleep(0.02)
        fwd.release.set()
        assert await asyncio.wait_for(fits, 5) == [2.0, 3.0]
        assert await asyncio.wait_for(running, 5) == [1.0]
        assert [7] not in fwd.seen and [8] not in fwd.seen
    finally:
        fwd.release.set()
        await b.close()


async def test_callers_with_their_own_admission_bypass_the_queue_limit(executor) -> None:
    fwd = RecordingForward(block=True)
    b = make_batcher(fwd, executor, max_queue_items=3, max_wait_s=0)
    try:
        running = asyncio.create_task(b.submit([enc(1)], later()))
        await wait_started(fwd)
        internal = asyncio.create_task(
            b.submit([enc(i) for i in range(10, 15)], later(), enforce_queue_limit=False)
        )
        await asyncio.sleep(0.02)
        assert b.queued == 5  # over the limit, and counted: other callers see the load
        with pytest.raises(Overloaded):
            await b.submit([enc(2)], later())
        fwd.release.set()
        assert await asyncio.wait_for(internal, 5) == [10.0, 11.0, 12.0, 13.0, 14.0]
        assert await asyncio.wait_for(running, 5) == [1.0]
    finally:
        fwd.release.set()
        await b.close()


# ---- deadlines: a running forward never holds a caller past its deadline --------------------


async def test_deadline_inside_a_running_forward_answers_at_the_deadline(executor) -> None:
    fwd = RecordingForward(block=True)
    b = make_batcher(fwd, executor, max_wait_s=0)
    try:
        with pytest.raises(DeadlineExceeded) as info:
            await asyncio.wait_for(b.submit([enc(5), enc(6)], time.monotonic() + 0.1), 5)
        assert info.value.http_status == 504 and "test" in info.value.message
        assert fwd.started.is_set() and not fwd.release.is_set()  # the forward still runs
        assert b.dropped["expired"] == 0  # they were forwarded, not dropped
        fwd.release.set()  # its late result is discarded, and the loop goes on
        assert await asyncio.wait_for(b.submit([enc(2)], later()), 5) == [2.0]
    finally:
        fwd.release.set()
        await b.close()


async def test_deadline_behind_a_running_forward_answers_at_the_deadline(executor) -> None:
    fwd = RecordingForward(block=True)
    b = make_batcher(fwd, executor, max_wait_s=0)
    try:
        running = asyncio.create_task(b.submit([enc(1)], later()))
        await wait_started(fwd)
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(b.submit([enc(555)], time.monotonic() + 0.1), 5)
        assert not fwd.release.is_set()  # answered while the forward ahead still runs
        assert b.dropped["expired"] == 1 and b.queued == 0
        fwd.release.set()
        assert await asyncio.wait_for(running, 5) == [1.0]
        assert await asyncio.wait_for(b.submit([enc(2)], later()), 5) == [2.0]
        assert [555] not in fwd.seen
    finally:
        fwd.release.set()
        await b.close()


async def test_a_cancelled_caller_in_the_forward_is_not_counted_as_dropped(executor) -> None:
    fwd = RecordingForward(block=True)
    b = make_batcher(fwd, executor, max_wait_s=0)
    try:
        running = asyncio.create_task(b.submit([enc(1)], later()))
        await wait_started(fwd)
        queued = asyncio.create_task(b.submit([enc(2), enc(3)], later()))
        await asyncio.sleep(0.02)
        running.cancel()
        queued.cancel()
        await asyncio.gather(running, queued, return_exceptions=True)
        assert b.dropped == {"cancelled": 2}  # only the queued two never reached a forward
        fwd.release.set()
        assert await asyncio.wait_for(b.submit([enc(4)], later()), 5) == [4.0]
        assert fwd.seen == [[1], [4]]
    finally:
        fwd.release.set()
        await b.close()


# ---- supervision: a dead loop answers everyone, restarts, and gives up past the limit -------


class ShortForward(RecordingForward):
    """Breaks the forward contract: one reward too few whenever the batch holds `bad`."""

    def __init__(self, bad: int, **kw) -> None:
        super().__init__(**kw)
        self.bad = bad

    def __call__(self, batch: Sequence[Encoded]) -> list[float]:
        rewards = super().__call__(batch)
        return rewards[:-1] if any(self.bad in e.input_ids for e in batch) else rewards


async def test_a_dead_loop_fails_its_batch_and_queue_with_unavailable_then_restarts(
    executor,
) -> None:
    fwd = ShortForward(bad=13, block=True)
    b = make_batcher(fwd, executor, max_wait_s=0, max_restarts=3)
    try:
        in_forward = asyncio.create_task(b.submit([enc(13)], later()))
        await wait_started(fwd)
        queued = asyncio.create_task(b.submit([enc(2), enc(3)], later()))
        await asyncio.sleep(0.02)
        fwd.release.set()
        for task in (in_forward, queued):
            with pytest.raises(Unavailable) as info:
                await asyncio.wait_for(task, 5)
            assert info.value.http_status == 503
            assert "'test'" in info.value.message
            assert "0 rewards for 1 items" in info.value.message
        assert b.dropped["failed"] == 2 and b.queued == 0
        assert b.restarts == 1 and not b.gave_up
        # the restarted loop serves again
        assert await asyncio.wait_for(b.submit([enc(4), enc(5)], later()), 5) == [4.0, 5.0]
        assert b.failure is None
    finally:
        fwd.release.set()
        await b.close()


async def test_the_restart_limit_holds_and_a_given_up_model_refuses_at_once(executor) -> None:
    fwd = ShortForward(bad=13)
    b = make_batcher(fwd, executor, max_wait_s=0, max_restarts=2)
    try:
        for restarts in (1, 2):
            with pytest.raises(Unavailable, match=rf"restarting \({restarts} of 2\)"):
                await asyncio.wait_for(b.submit([enc(13)], later()), 5)
            assert await asyncio.wait_for(b.submit([enc(1)], later()), 5) == [1.0]
        with pytest.raises(Unavailable, match="gave up after 2 restarts"):
            await asyncio.wait_for(b.submit([enc(13)], later()), 5)
        assert b.gave_up and b.failure and "unload and load" in b.failure
        calls = len(fwd.calls)
        for _ in range(2):  # refused at once, never queued
            with pytest.raises(Unavailable, match="gave up"):
                await asyncio.wait_for(b.submit([enc(1)], later()), 5)
        assert len(fwd.calls) == calls
    finally:
        await b.close()


async def test_submissions_while_the_loop_waits_to_restart_get_503_at_once(executor) -> None:
    fwd = ShortForward(bad=13)
    b = make_batcher(fwd, executor, max_wait_s=0, restart_backoff_s=60)
    try:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(b.submit([enc(13)], later()), 5)
        assert b.failure and "restarting (1 of 3)" in b.failure
        with pytest.raises(Unavailable, match="restarting"):
            await asyncio.wait_for(b.submit([enc(1)], later()), 5)
    finally:
        await b.close()  # also ends the backoff wait
    with pytest.raises(Unavailable, match="not loaded"):
        await b.submit([enc(1)], later())


class FailOnce:
    """Stands in for a metrics object: its first use raises, later uses reach the real one."""

    def __init__(self, real) -> None:
        self.real, self.failed = real, False

    def labels(self, *args):
        if not self.failed:
            self.failed = True
            raise RuntimeError("metrics backend broke")
        return self.real.labels(*args)


async def test_a_metrics_failure_after_a_forward_is_supervised(executor, monkeypatch) -> None:
    monkeypatch.setattr(batcher_module.metrics, "ITEMS", FailOnce(batcher_module.metrics.ITEMS))
    fwd = RecordingForward(block=True)
    b = make_batcher(fwd, executor, max_wait_s=0)
    try:
        first = asyncio.create_task(b.submit([enc(1)], later()))
        await wait_started(fwd)
        queued = asyncio.create_task(b.submit([enc(2)], later()))
        await asyncio.sleep(0.02)
        fwd.release.set()
        # The forward's own caller was answered before the metrics ran; the one behind it
        # was held by the loop that died, and learns so at once rather than never.
        assert await asyncio.wait_for(first, 5) == [1.0]
        with pytest.raises(Unavailable, match="metrics backend broke"):
            await asyncio.wait_for(queued, 5)
        assert await asyncio.wait_for(b.submit([enc(3)], later()), 5) == [3.0]
        assert b.restarts == 1
    finally:
        fwd.release.set()
        await b.close()
