"""The runtime's jobs manager as both transports reach it: refused alike when jobs are off."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rewardserve.schemas.errors import Unavailable

if TYPE_CHECKING:
    from rewardserve.jobs.manager import JobManager

DISABLED = "jobs are disabled on this service (start it with --jobs-enabled)"


def manager_of(runtime: Any) -> JobManager:
    """runtime.jobs; Unavailable (503 / UNAVAILABLE) when the service runs without one."""
    manager = getattr(runtime, "jobs", None)
    if manager is None:
        raise Unavailable(DISABLED)
    return manager
