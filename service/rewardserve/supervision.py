"""A loop the service cannot do without, supervised: run as a task, restarted with doubling
backoff when it raises, at most `max_restarts` times, then given up. While it is down,
`failure` says why (readiness: /readyz, gRPC health) and listeners are told of every change.

The scoring batcher's loop and the jobs scheduler run under one each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable


class SupervisedLoop:
    def __init__(
        self,
        what: str,
        run: Callable[[], Awaitable[None]],
        *,
        max_restarts: int,
        backoff_s: float,
        logger: logging.Logger,
        log_prefix: str = "",
        listeners: list[Callable[[], None]] | None = None,
        on_failure: Callable[[str], None] | None = None,
        give_up_hint: str = "",
    ) -> None:
        self.what = what
        """The loop in words, as `failure` and the log name it ("jobs scheduler")."""
        self._run = run
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        """The first restart's delay; each further one waits twice the one before."""
        self._log = logger
        self._prefix = log_prefix
        self.listeners = listeners if listeners is not None else []
        """Told when `failure` is set or cleared (the caller's list, kept by reference)."""
        self._on_failure = on_failure  # told first, with the failure: answers waiting callers
        self._give_up_hint = give_up_hint  # how an operator gets it back after it gave up
        self.restarts = 0
        self.gave_up = False
        self.failure: str | None = None
        """Why the loop is down (None while it runs)."""
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def running(self) -> bool:
        """Started and not closed (it may still be down: see `failure`)."""
        return self._task is not None and not self._closed

    def start(self, task_name: str) -> None:
        self._task = asyncio.create_task(self._supervise(), name=task_name)
        self._task.add_done_callback(self._on_task_exit)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _supervise(self) -> None:
        while True:
            try:
                await self._run()
            except Exception as e:  # CancelledError (close) is not caught: it ends the task
                if not self._failed(e):
                    return
                await asyncio.sleep(self.backoff_s * 2 ** (self.restarts - 1))
                self._log.warning(
                    "%s%s restarted (%d of %d)",
                    self._prefix,
                    self.what,
                    self.restarts,
                    self.max_restarts,
                )
                self.failure = None
                self._changed()

    def _changed(self) -> None:
        for listener in self.listeners:
            try:
                listener()
            except Exception:  # a listener's bug must not take the loop down with it
                self._log.exception("%s%s: state listener failed", self._prefix, self.what)

    def _failed(self, exc: BaseException, *, final: bool = False) -> bool:
        """Record why the loop died and tell everyone; True when it may restart."""
        reason = f"{self.what} failed ({type(exc).__name__}: {exc})"
        self.gave_up = final or self.restarts >= self.max_restarts
        if self.gave_up:
            self.failure = f"{reason}; gave up after {self.restarts} restarts{self._give_up_hint}"
        else:
            self.restarts += 1
            self.failure = f"{reason}; restarting ({self.restarts} of {self.max_restarts})"
        if self._on_failure is not None:
            self._on_failure(self.failure)
        self._log.error("%s%s", self._prefix, self.failure, exc_info=exc)
        self._changed()
        return not self.gave_up

    def _on_task_exit(self, task: asyncio.Task[None]) -> None:
        # The supervisor itself ended without giving up (a BaseException, a failure while
        # handling one, or the event loop cancelling it): nobody is left to restart it.
        if self._closed or self.gave_up:
            return
        exc = None if task.cancelled() else task.exception()
        self._failed(exc or RuntimeError(f"the {self.what} stopped"), final=True)
