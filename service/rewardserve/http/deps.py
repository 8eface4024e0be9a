"""Small request helpers shared by routers."""

from __future__ import annotations

from fastapi import Request

from rewardserve.auth import ANY, FIELD, OPEN, REQUIREMENTS
from rewardserve.engine.engine import ScoringEngine
from rewardserve.runtime import Runtime
from rewardserve.schemas.errors import InvalidArgument, PermissionDenied

TIMEOUT_HEADER = "x-request-timeout"


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def engine(request: Request) -> ScoringEngine:
    return runtime(request).scoring


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


SCOPES_KEY = "rewardserve.scopes"
"""ASGI scope key under which the Authenticate middleware leaves the caller's scopes."""


class RequireScope:
    """A route's scope declaration, `dependencies=[Depends(require("score"))]`.

    The Authenticate middleware reads it off the matched route and checks the key before the
    body is read; this dependency only confirms that happened (and refuses if it did not)."""

    def __init__(self, scope: str) -> None:
        if scope not in REQUIREMENTS:
            raise ValueError(f"unknown scope requirement '{scope}' (one of {REQUIREMENTS})")
        self.scope = scope

    async def __call__(self, request: Request) -> None:
        # async so FastAPI runs it on the event loop, not in its worker-thread pool
        if self.scope == OPEN:
            return
        granted = request.scope.get(SCOPES_KEY)
        if granted is None or (self.scope != ANY and self.scope not in granted):
            raise PermissionDenied(f"not authorized for the '{self.scope}' scope", field=FIELD)


def require(scope: str) -> RequireScope:
    return RequireScope(scope)
