"""ASGI middleware: request body size limit and per-route metrics (API keys: http/auth.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rewardserve import metrics
from rewardserve.schemas.errors import InvalidArgument, PayloadTooLarge, ServiceError


def error_json(err: ServiceError) -> bytes:
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
            return await send_error(send, 415, error_json(wrong))
        payload = error_json(
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
