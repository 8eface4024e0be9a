"""Bearer API keys with scopes, as a FastAPI dependency."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from rewardserve.schemas.errors import PermissionDenied, Unauthenticated


def check_key(keys: dict[str, set[str]], authorization: str | None, scope: str) -> None:
    """Raise unless `authorization` ("Bearer <key>") grants `scope`. No keys: open service."""
    if not keys:
        return
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthenticated("missing 'Authorization: Bearer <api key>'", field="authorization")
    given = authorization[7:].strip()
    # compare_digest on every key: no early exit that leaks which prefix matched
    scopes = next((s for k, s in keys.items() if hmac.compare_digest(k, given)), None)
    if scopes is None:
        raise Unauthenticated("invalid API key", field="authorization")
    if scope != "any" and scope not in scopes:
        raise PermissionDenied(f"this API key lacks the '{scope}' scope", field="authorization")


def require(scope: str) -> Callable[[Request], Awaitable[None]]:
    # async so FastAPI runs it on the event loop, not in its worker-thread pool
    async def dependency(request: Request) -> None:
        check_key(request.app.state.api_keys, request.headers.get("authorization"), scope)

    return dependency
