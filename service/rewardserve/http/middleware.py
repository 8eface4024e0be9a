"""ASGI middleware: API keys (before the body is read), body size limit, per-route metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rewardserve import metrics
from rewardserve.auth import ANY, OPEN, UNDECLARED, KeyRing
from rewardserve.http.deps import SCOPES_KEY, RequireScope
from rewardserve.schemas.errors import (
    InvalidArgument,
    PayloadTooLarge,
    ServiceError,
    Unauthenticated,
)


def _error_json(err: ServiceError) -> bytes:
    return json.dumps(err.body().model_dump()).encode()


async def send_error(
    send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


def declared_scope(route: BaseRoute, open_paths: Collection[str]) -> str | None:
    """The scope a route declares (`Depends(require(...))`, its own or its router's), or
    None when it declares none or more than one."""
    if getattr(route, "path", None) in open_paths:
        return OPEN
    declared = {
        d.dependency.scope
        for d in getattr(route, "dependencies", ())
        if isinstance(d.dependency, RequireScope)
    }
    return declared.pop() if len(declared) == 1 else None


class Authenticate:
    """Check the API key against the matched route's declared scope before anything reads
    the body, so an unauthenticated client gets 401/403 whatever it sends and however much.

    Routes are matched as the router will match them; a route that declares no scope needs
    admin (fail closed); a path that matches no route needs any valid key (then 404s)."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        routes: Sequence[BaseRoute],
        open_paths: Collection[str] = (),
    ) -> None:
        self.app, self.keys, self.routes, self.open_paths = app, keys, routes, open_paths

    def _match(self, scope: Scope) -> BaseRoute | None:
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route
            if match is Match.PARTIAL and partial is None:
                partial = route  # path matches, method does not: the router answers 405
        return partial

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)  # lifespan
        route = self._match(scope)
        required = ANY if route is None else declared_scope(route, self.open_paths) or UNDECLARED
        headers = scope["headers"]
        authorization = next((v for k, v in headers if k == b"authorization"), None)
        try:
            scope[SCOPES_KEY] = self.keys.authorize(authorization, required)
        except ServiceError as err:
            if scope["type"] == "websocket":
                # closing before accept refuses the handshake (the server answers 403)
                return await send({"type": "websocket.close", "code": 1008})
            if route is not None:
                scope["route"] = route  # for the Metrics label
            extra = [(b"www-authenticate", b"Bearer")] if isinstance(err, Unauthenticated) else []
            if any(
                k == b"transfer-encoding" or (k == b"content-length" and v.strip() != b"0")
                for k, v in headers
            ):
                # The body is never read: close rather than leave it on the connection.
                extra.append((b"connection", b"close"))
            return await send_error(send, err.http_status, _error_json(err), extra)
        await self.app(scope, receive, send)


class BodyGuard:
    """Refuse non-JSON bodies (415) and bodies over `limit` bytes (413) before parsing.

    The body is read (up to the limit) and replayed to the app; later receive() calls pass
    through so handlers still learn when the client disconnects.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if ctype != b"application/json" and not ctype.endswith(b"+json"):
            wrong = InvalidArgument(
                f"Content-Type must be application/json, not '{ctype.decode(errors='replace')}'",
                field="content-type",
            )
            return await send_error(send, 415, _error_json(wrong))
        payload = _error_json(
            PayloadTooLarge(f"request body exceeds {self.limit} bytes", field="body")
        )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await send_error(send, 413, payload)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                return await send_error(send, 413, payload)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class Metrics:
    """Count and time every request by its route template (not the raw path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.REQUESTS.labels("http", path, str(status)).inc()
            metrics.LATENCY.labels("http", path).observe(time.perf_counter() - started)
