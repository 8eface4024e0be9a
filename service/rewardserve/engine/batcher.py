"""Continuous micro-batching for one model: admission, forward planning, forward off the loop.

Requests put their encoded items on a queue and await one future per item. A single loop
per model, whenever the model is free, plans the next forward: the oldest waiting item plus
the waiting items that pack best with it (similar lengths, so little padding), within a row
and padded-token budget. That forward runs in the shared worker thread so the event loop
keeps serving; its callers are answered as soon as it ends, and the next forward is planned
afresh with whatever arrived meanwhile. Answering per forward, rather than per gathered
batch, keeps the model busy while answered clients send their next requests, and lets new
arrivals join a length-matched forward. Nothing here knows of HTTP or gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from rewardserve import metrics
from rewardserve.engine.inputs import Encoded
from rewardserve.schemas.errors import DeadlineExceeded, Overloaded, Unavailable

log = logging.getLogger(__name__)

ForwardFn = Callable[[Sequence[Encoded]], list[float]]
"""One padded forward over exactly the items given; rewards in the same order."""

# Fixed cost of one forward in token-equivalents, traded against padding by the planner.
# Measured for all-MiniLM on 2 cores (benchmarks/bench_scoring.py runs both ways); larger
# values gave fewer, more padded forwards and lower throughput.
FORWARD_OVERHEAD_TOKENS = 96


@dataclass(slots=True)
class Pending:
    item: Encoded
    deadline: float
    """time.monotonic() after which the result is useless."""
    future: asyncio.Future[float] = field(repr=False)
    queued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 2048
    """Padded tokens (rows x longest) of one forward; one item longer than this runs alone."""
    max_batch_size: int = 64
    """Rows of one forward, and how many waiting items one plan chooses among."""
    max_wait_s: float = 0.002
    max_queue_items: int = 2048
    overhead_tokens: int = FORWARD_OVERHEAD_TOKENS


def plan_microbatches(
    lengths: Sequence[int],
    overhead_tokens: int = FORWARD_OVERHEAD_TOKENS,
    max_tokens: int = 2048,
    max_rows: int | None = None,
) -> list[list[int]]:
    """Split items into forwards that minimise padded tokens + per-forward overhead.

    Items are sorted by length; an optimal split of a sorted list into contiguous groups is a
    small dynamic programme (cost of a group = rows x its longest + overhead; a group may not
    exceed `max_tokens` padded tokens or `max_rows` rows unless it holds one item). Returns
    lists of indices into `lengths`, shortest group first.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    rows_cap = max_rows or n
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = lengths[order[end - 1]]
        for start in range(end - 1, -1, -1):
            rows = end - start
            if rows > 1 and (rows > rows_cap or rows * longest > max_tokens):
                break
            cost = best[start] + rows * longest + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups: list[list[int]] = []
    end = n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def next_batch(queue: deque[Pending], limits: BatchLimits, now: float) -> list[Pending]:
    """Pop the items of the next forward: the oldest live item and its best companions.

    The first `max_batch_size` live items are planned into forwards (`plan_microbatches`);
    the forward holding the oldest item is popped and returned, the others go back to the
    front of the queue in arrival order. Always taking the oldest item means nothing starves
    however its length compares. Items that can no longer be answered are dropped on the way:
    cancelled ones silently, expired ones with DeadlineExceeded.
    """
    window: list[Pending] = []
    while queue and len(window) < limits.max_batch_size:
        p = queue.popleft()
        if p.future.done():  # caller went away (cancelled) or already answered
            continue
        if p.deadline <= now:
            p.future.set_exception(DeadlineExceeded("deadline passed before the item was scored"))
            continue
        window.append(p)
    if not window:
        return []
    groups = plan_microbatches(
        [len(p.item) for p in window],
        limits.overhead_tokens,
        limits.max_batch_tokens,
        limits.max_batch_size,
    )
    chosen = set(next(g for g in groups if 0 in g))
    queue.extendleft(reversed([p for i, p in enumerate(window) if i not in chosen]))
    return [p for i, p in enumerate(window) if i in chosen]


class Batcher:
    def __init__(
        self, name: str, forward: ForwardFn, executor: Executor, limits: BatchLimits
    ) -> None:
        self.name = name
        self._forward = forward
        self._executor = executor
        self.limits = limits
        self._queue: deque[Pending] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._avg_item_s = 0.02  # running estimate, for Retry-After
        self._last_batch_size = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Stop the loop; items still queued fail with Unavailable."""
        self._closed = True
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(Unavailable(f"model '{self.name}' was unloaded"))
        metrics.QUEUE_DEPTH.labels(self.name).set(0)

    async def submit(
        self, items: Sequence[Encoded], deadline: float, *, enforce_queue_limit: bool = True
    ) -> list[float]:
        """Rewards for `items`, in order. Refuses at once when the queue is full, unless
        `enforce_queue_limit` is False (callers whose load is bounded by their own admission,
        such as Best-of-N, which must not be refused by the scorer it feeds)."""
        if self._closed:
            raise Unavailable(f"model '{self.name}' is not loaded")
        if enforce_queue_limit and self.queued + len(items) > self.limits.max_queue_items:
            metrics.REJECTED.labels(self.name).inc()
            retry = max(1.0, self.queued * self._avg_item_s)
            raise Overloaded(
                f"model '{self.name}' has {self.queued} items queued "
                f"(limit {self.limits.max_queue_items}); retry later",
                retry_after_s=round(retry, 1),
            )
        if deadline <= time.monotonic():
            raise DeadlineExceeded("deadline passed before the items were queued")
        loop = asyncio.get_running_loop()
        pending = [Pending(it, deadline, loop.create_future()) for it in items]
        self._queue.extend(pending)
        metrics.QUEUE_DEPTH.labels(self.name).set(self.queued)
        self._wake.set()
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        except BaseException:
            # Caller cancelled or one item failed: the rest need not run.
            for p in pending:
                p.future.cancel()
            raise

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._gather_window()
                before = self.queued
                batch = next_batch(self._queue, self.limits, time.monotonic())
                if dropped := before - self.queued - len(batch):
                    metrics.DROPPED.labels(self.name).inc(dropped)
                metrics.QUEUE_DEPTH.labels(self.name).set(self.queued)
                if batch:
                    self._last_batch_size = len(batch)
                    await self._run_batch(batch)

    async def _gather_window(self) -> None:
        """Under concurrency (the last forward held several items), let the oldest waiting
        item wait up to max_wait for companions; a lone caller never pays the window."""
        if (
            self.limits.max_wait_s
            and self._last_batch_size > 1
            and self.queued < self.limits.max_batch_size
        ):
            wait = self._queue[0].queued_at + self.limits.max_wait_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)

    async def _run_batch(self, batch: list[Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            rewards = await loop.run_in_executor(
                self._executor, self._forward, [p.item for p in batch]
            )
        except asyncio.CancelledError:
            # close() while this batch ran: its callers must still get an answer.
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(Unavailable(f"model '{self.name}' was unloaded"))
            raise
        except Exception as e:  # a failed forward fails its batch, not the loop
            log.exception("forward of %d items on %s failed", len(batch), self.name)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        elapsed = time.perf_counter() - started
        self._avg_item_s = 0.8 * self._avg_item_s + 0.2 * elapsed / len(batch)
        metrics.FORWARD_SECONDS.labels(self.name).observe(elapsed)
        metrics.BATCH_SIZE.labels(self.name).observe(len(batch))
        metrics.ITEMS.labels(self.name).inc(len(batch))
        metrics.TOKENS.labels(self.name).inc(sum(len(p.item) for p in batch))
        for p, r in zip(batch, rewards, strict=True):
            if not p.future.done():
                p.future.set_result(r)
