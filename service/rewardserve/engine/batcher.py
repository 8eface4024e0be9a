"""Continuous micro-batching for one model: admission, forward planning, forward off the loop.

Requests put their encoded items on a queue and await one future per item. A single loop
per model, whenever the model is free, plans the next forward: the oldest waiting item plus
the waiting items that pack best with it (similar lengths, so little padding), within a row
and padded-token budget. That forward runs in the shared worker thread so the event loop
keeps serving; its callers are answered as soon as it ends, and the next forward is planned
afresh with whatever arrived meanwhile. Answering per forward, rather than per gathered
batch, keeps the model busy while answered clients send their next requests, and lets new
arrivals join a length-matched forward. Nothing here knows of HTTP or gRPC.

The loop is supervised: if it dies (a bug outside a forward, a forward that breaks its
contract), every item it holds fails at once with Unavailable, the batcher reports itself
failed (the model shows as errored and readiness turns red) and the loop restarts a bounded
number of times. Each caller waits at most until its own deadline, whether its items are
queued or inside a running forward; a late result is discarded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Literal

from rewardserve import metrics
from rewardserve.engine.inputs import Encoded
from rewardserve.schemas.errors import DeadlineExceeded, InvalidArgument, Overloaded, Unavailable
from rewardserve.supervision import SupervisedLoop

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
    state: Literal["queued", "running", "done"] = "queued"
    """queued -> running (in a forward) or done (its caller stopped waiting)."""


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


class ForwardContractError(RuntimeError):
    """A forward returned something other than one reward per item: its results cannot be
    matched to their items, so the batcher treats the model as broken, not the batch."""


def _drop_reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"  # the caller went away (client disconnect, task cancelled)
    if isinstance(exc, DeadlineExceeded):
        return "expired"
    return "failed"  # a sibling item failed, the loop died or the model was unloaded


class Batcher:
    def __init__(
        self,
        name: str,
        forward: ForwardFn,
        executor: Executor,
        limits: BatchLimits,
        *,
        max_restarts: int = 3,
        restart_backoff_s: float = 0.5,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._forward = forward
        self._executor = executor
        self.limits = limits
        self._queue: deque[Pending] = deque()
        # Items still waiting for a forward; the deque may also hold items whose callers
        # already stopped waiting, which are skipped when reached and must not count.
        self._live = 0
        self._in_flight: list[Pending] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._loop = SupervisedLoop(
            "batcher loop",
            self._run,
            max_restarts=max_restarts,
            backoff_s=restart_backoff_s,
            logger=log,
            log_prefix=f"model {name}: ",
            listeners=[on_change] if on_change is not None else [],  # told when `failure` changes
            on_failure=self._loop_failed,
            give_up_hint=" (unload and load the model to serve it again)",
        )
        self._avg_item_s = 0.02  # running estimate, for Retry-After
        self._last_batch_size = 0
        self.dropped: Counter[str] = Counter()
        """Items that left the queue without a forward, by reason: cancelled, expired, failed."""

    @property
    def restarts(self) -> int:
        return self._loop.restarts

    @property
    def gave_up(self) -> bool:
        """The loop failed more than max_restarts times: failed until unloaded and loaded."""
        return self._loop.gave_up

    @property
    def failure(self) -> str | None:
        """Why the loop is down (None while it serves)."""
        return self._loop.failure

    @property
    def queued(self) -> int:
        """Items waiting for a forward whose callers still wait for them."""
        return self._live

    def start(self) -> None:
        self._loop.start(f"batcher-{self.name}")

    async def close(self) -> None:
        """Stop the loop; items queued or in the forward fail with Unavailable."""
        self._closed = True
        await self._loop.close()
        self._fail_held(f"model '{self.name}' was unloaded")
        metrics.QUEUE_DEPTH.labels(self.name).set(0)

    def check_request_size(self, n: int, field: str = "items") -> None:
        """A request the whole queue could never hold is the caller's error, not overload:
        retrying it would never succeed."""
        if n > self.limits.max_queue_items:
            raise InvalidArgument(
                f"{n} items in one request, but model '{self.name}' queues at most "
                f"{self.limits.max_queue_items}; split the request",
                field=field,
            )

    async def submit(
        self, items: Sequence[Encoded], deadline: float, *, enforce_queue_limit: bool = True
    ) -> list[float]:
        """Rewards for `items`, in order, or an error by `deadline` at the latest.

        Refuses at once when the queue is full (429) or the model is down (503). Callers that
        do their own admission (Best-of-N) pass enforce_queue_limit=False: their items are
        queued regardless, and count toward the limit other callers see.
        """
        if self._closed:
            raise Unavailable(f"model '{self.name}' is not loaded")
        if self.failure is not None:
            raise Unavailable(f"model '{self.name}' is unavailable: {self.failure}")
        if enforce_queue_limit:
            self.check_request_size(len(items))
            if self._live + len(items) > self.limits.max_queue_items:
                metrics.REJECTED.labels(self.name).inc()
                retry = max(1.0, self._live * self._avg_item_s)
                raise Overloaded(
                    f"model '{self.name}' has {self._live} items queued "
                    f"(limit {self.limits.max_queue_items}); retry later",
                    retry_after_s=round(retry, 1),
                )
        if deadline <= time.monotonic():
            raise DeadlineExceeded("deadline passed before the items were queued")
        if not items:
            return []
        loop = asyncio.get_running_loop()
        pending = [Pending(it, deadline, loop.create_future()) for it in items]
        self._queue.extend(pending)
        self._live += len(pending)
        metrics.QUEUE_DEPTH.labels(self.name).set(self._live)
        self._wake.set()
        # A running forward never holds a caller past its deadline: at the deadline its
        # items fail, and a result that arrives later is discarded.
        expiry = loop.call_later(max(0.0, deadline - time.monotonic()), self._expire, pending)
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        except BaseException as e:
            # Cancelled, expired or one item failed: the rest need not run.
            self._abandon(pending, _drop_reason(e))
            raise
        finally:
            expiry.cancel()

    def _expire(self, pending: Sequence[Pending]) -> None:
        late = [p for p in pending if not p.future.done()]
        message = (
            f"deadline passed with {len(late)} of {len(pending)} items not yet scored by "
            f"model '{self.name}'"
        )
        for p in late:
            p.future.set_exception(DeadlineExceeded(message))

    def _abandon(self, pending: Sequence[Pending], reason: str) -> None:
        """The caller stopped waiting for `pending`: drop what is still queued, discard what
        a running forward will return."""
        dropped = 0
        for p in pending:
            if p.state == "queued":
                self._live -= 1
                dropped += 1
            p.state = "done"
            if not p.future.done():
                p.future.cancel()
            elif not p.future.cancelled():
                p.future.exception()  # one error answers the request; mark the rest retrieved
        if dropped:
            self.dropped[reason] += dropped
            metrics.DROPPED.labels(self.name, reason).inc(dropped)
            metrics.QUEUE_DEPTH.labels(self.name).set(self._live)

    def _fail_held(self, message: str) -> None:
        """Fail every item the loop holds, queued or in the forward, with Unavailable."""
        failed = 0
        for p in [*self._in_flight, *self._queue]:
            if not p.future.done():
                p.future.set_exception(Unavailable(message))
            if p.state == "queued":
                p.state = "done"
                failed += 1
        self._in_flight = []
        self._queue.clear()
        self._live -= failed
        if failed:
            self.dropped["failed"] += failed
            metrics.DROPPED.labels(self.name, "failed").inc(failed)
        metrics.QUEUE_DEPTH.labels(self.name).set(self._live)

    # ---- the supervised loop ---------------------------------------------------------------

    def _loop_failed(self, failure: str) -> None:
        # Answer the callers first: nothing after this may leave them waiting.
        self._fail_held(f"model '{self.name}' is unavailable: {failure}")
        metrics.LOOP_FAILURES.labels(self.name).inc()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._gather_window()
                batch = next_batch(self._queue, self.limits, time.monotonic())
                for p in batch:
                    p.state = "running"
                self._live -= len(batch)
                metrics.QUEUE_DEPTH.labels(self.name).set(self._live)
                if batch:
                    self._last_batch_size = len(batch)
                    await self._run_batch(batch)

    async def _gather_window(self) -> None:
        """Under concurrency (the last forward held several items), let the oldest waiting
        item wait up to max_wait for companions; a lone caller never pays the window."""
        if (
            self.limits.max_wait_s
            and self._last_batch_size > 1
            and self._live < self.limits.max_batch_size
        ):
            wait = self._queue[0].queued_at + self.limits.max_wait_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)

    async def _run_batch(self, batch: list[Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self._in_flight = batch  # answered by the supervisor or close() if the loop dies
        try:
            rewards = await loop.run_in_executor(
                self._executor, self._forward, [p.item for p in batch]
            )
        except Exception as e:  # a failed forward fails its batch, not the loop
            log.exception("forward of %d items on %s failed", len(batch), self.name)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            self._in_flight = []
            return
        if len(rewards) != len(batch):
            raise ForwardContractError(
                f"the forward returned {len(rewards)} rewards for {len(batch)} items"
            )
        for p, r in zip(batch, rewards, strict=True):
            if not p.future.done():  # a caller past its deadline has stopped waiting
                p.future.set_result(r)
        self._in_flight = []
        elapsed = time.perf_counter() - started
        self._avg_item_s = 0.8 * self._avg_item_s + 0.2 * elapsed / len(batch)
        metrics.FORWARD_SECONDS.labels(self.name).observe(elapsed)
        metrics.BATCH_SIZE.labels(self.name).observe(len(batch))
        metrics.ITEMS.labels(self.name).inc(len(batch))
        metrics.TOKENS.labels(self.name).inc(sum(len(p.item) for p in batch))
