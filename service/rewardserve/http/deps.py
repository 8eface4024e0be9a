"""Small request helpers shared by routers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from rewardserve.engine.scoring import ScoringEngine
from rewardserve.jobs.enabled import manager_of
from rewardserve.runtime import Runtime
from rewardserve.schemas.errors import InvalidArgument

if TYPE_CHECKING:
    from rewardserve.jobs.manager import JobManager

TIMEOUT_HEADER = "x-request-timeout"


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def scoring(request: Request) -> ScoringEngine:
    return runtime(request).scoring


def jobs(request: Request) -> JobManager:
    """The jobs manager; Unavailable when this service runs without one."""
    return manager_of(runtime(request))


def timeout_s(request: Request) -> float | None:
    """Client deadline in seconds from the X-Request-Timeout header, if given."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"'{raw}' is not a number of seconds", field=TIMEOUT_HEADER) from None
    if not 0 < value <= 3600:
        raise InvalidArgument("must be in (0, 3600] seconds", field=TIMEOUT_HEADER)
    return value
