"""Dynamic batching for one model: admission, batch formation, forward off the event loop.

Requests put their encoded items on a queue and await one future per item. A single loop
per model waits until the model is free, gathers what has queued (plus a short `max_wait`
window for stragglers), drops items whose caller is gone or whose deadline passed, and runs
the forward in the shared worker thread so the event loop keeps serving. Nothing here knows
of HTTP or gRPC.
"""

from __future__ import annotations

import asyncio
import logging
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


@dataclass(slots=True)
class Pending:
    item: Encoded
    deadline: float
    """time.monotonic() after which the result is useless."""
    future: asyncio.Future[float] = field(repr=False)


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 16384
    max_batch_size: int = 64
    max_wait_s: float = 0.002
    max_queue_items: int = 2048


def take_batch(queue: deque[Pending], limits: BatchLimits, now: float) -> list[Pending]:
    """Pop the next batch off the queue, oldest first, within the token and size budget.

    Items that can no longer be answered are popped and dropped on the way: cancelled ones
    silently, expired ones with DeadlineExceeded. Token cost is the sum of lengths: the scorer
    sorts a batch into length-homogeneous micro-batches, so padding does not count against it.
    The oldest live item is always taken, however long, so nothing starves.
    """
    batch: list[Pending] = []
    tokens = 0
    while queue and len(batch) < limits.max_batch_size:
        p = queue[0]
        if p.future.done():  # caller went away (cancelled) or already answered
            queue.popleft()
            continue
        if p.deadline <= now:
            queue.popleft()
            p.future.set_exception(DeadlineExceeded("deadline passed before the item was scored"))
            continue
        if batch and tokens + len(p.item) > limits.max_batch_tokens:
            break
        queue.popleft()
        batch.append(p)
        tokens += len(p.item)
    return batch


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

    async def submit(self, items: Sequence[Encoded], deadline: float) -> list[float]:
        """Rewards for `items`, in order. Refuses at once when the queue is full."""
        if self._closed:
            raise Unavailable(f"model '{self.name}' is not loaded")
        if self.queued + len(items) > self.limits.max_queue_items:
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
                # Wait for stragglers only under concurrency (the last batch held several
                # items): a lone caller should not pay the window on every request.
                if (
                    self.limits.max_wait_s
                    and self._last_batch_size > 1
                    and self.queued < self.limits.max_batch_size
                ):
                    await asyncio.sleep(self.limits.max_wait_s)
                before = self.queued
                batch = take_batch(self._queue, self.limits, time.monotonic())
                if dropped := before - self.queued - len(batch):
                    metrics.DROPPED.labels(self.name).inc(dropped)
                metrics.QUEUE_DEPTH.labels(self.name).set(self.queued)
                if batch:
                    self._last_batch_size = len(batch)
                    await self._run_batch(batch)

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
