"""The heap trimmer: glibc's malloc_trim is found here and called while the service runs."""

from __future__ import annotations

import asyncio

from rewardserve.heap import HeapTrimmer, malloc_trim


def test_malloc_trim_is_found_on_glibc() -> None:
    trim = malloc_trim()
    assert trim is not None  # these machines run glibc; elsewhere the trimmer is a no-op
    assert trim() in (0, 1)  # 1: memory was released, 0: there was none to release


async def test_trims_while_running_and_stops_on_close() -> None:
    trimmer = HeapTrimmer(0.01)
    trimmer.start()
    for _ in range(500):
        if trimmer.trims >= 3:
            break
        await asyncio.sleep(0.01)
    assert trimmer.trims >= 3
    await trimmer.close()
    done = trimmer.trims
    await asyncio.sleep(0.05)
    assert trimmer.trims == done


async def test_interval_zero_never_trims() -> None:
    trimmer = HeapTrimmer(0)
    trimmer.start()
    await asyncio.sleep(0.05)
    assert trimmer.trims == 0
    await trimmer.close()
