"""Gives freed heap memory back to the OS at intervals (glibc's malloc_trim).

A scorer's forwards allocate tensors of a different shape every time (batches are planned
afresh by length), and glibc keeps what they free in its arenas instead of returning it:
under a steady scoring load the service's RSS grew by 33 % in 10 minutes (882 -> 1,172 MiB,
benchmarks/soak.py), the same before and after issue 9's changes, while Python's own objects
did not grow. The same soak with malloc_trim(0) every 2 s stayed flat (792 -> 735 MiB).
No allocator on PyPI does this for us (jemalloc/tcmalloc would need LD_PRELOAD and a
system package), so it is done here, off the event loop. A no-op where libc has no
malloc_trim (musl, macOS).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def malloc_trim() -> Callable[[], int] | None:
    """glibc's malloc_trim(0), or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: fn(0)


class HeapTrimmer:
    """Calls malloc_trim every `interval_s` seconds in a worker thread while running."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.trims = 0
        self._trim = malloc_trim() if interval_s > 0 else None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._trim is not None:
            self._task = asyncio.create_task(self._run(), name="heap-trimmer")

    async def _run(self) -> None:
        assert self._trim is not None
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self._trim)
                self.trims += 1
            except Exception:  # never worth stopping the service for
                log.warning("malloc_trim failed", exc_info=True)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
