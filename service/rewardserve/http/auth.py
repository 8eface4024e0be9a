"""The REST side of API keys: each route's scope declaration and the ASGI middleware that
checks it (the gRPC side: grpc/auth.py; both use rewardserve.auth).

A route declares its scope with `dependencies=[Depends(require("score"))]` (on the route or on
its router): "score", "admin", "any" (any valid key) or "open" (no key).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from fastapi import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from rewardserve.auth import ANY, FIELD, OPEN, REQUIREMENTS, UNDECLARED, KeyRing
from rewardserve.http.middleware import error_json, send_error
from rewardserve.schemas.errors import PermissionDenied, ServiceError, Unauthenticated

SCOPES_KEY = "rewardserve.scopes"
"""ASGI scope key under which Authenticate leaves the caller's scopes."""


class RequireScope:
    """A route's scope declaration. Authenticate reads it off the matched route and checks the
    key before the body is read; as a dependency it only confirms that happened (and refuses
    if it did not, e.g. in an app built without the middleware)."""

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
            return await send_error(send, err.http_status, error_json(err), extra)
        await self.app(scope, receive, send)
