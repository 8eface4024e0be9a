"""API-key check for every RPC except the health service, as a server interceptor."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from rewardserve.http.auth import check_key
from rewardserve.schemas.errors import ServiceError

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _denying(handler: grpc.RpcMethodHandler, err: ServiceError) -> grpc.RpcMethodHandler:
    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        context.set_trailing_metadata((("error-code", err.code), ("error-field", "authorization")))
        await context.abort(grpc.StatusCode[err.grpc_status], err.message)

    async def deny_stream(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await deny(_request, context)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: dict[str, set[str]]) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not self.keys or details.method.startswith(OPEN_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        try:
            check_key(self.keys, metadata.get("authorization"), "score")
        except ServiceError as e:
            return _denying(handler, e)
        return handler
