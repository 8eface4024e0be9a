"""The scope each RPC needs, and the server interceptor that checks the API key for it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from rewardserve.auth import ADMIN, FIELD, OPEN, SCORE, UNDECLARED, KeyRing
from rewardserve.schemas.errors import ServiceError

# Every RPC of rewardserve.v1 by full method name. An RPC missing here needs admin
# (UNDECLARED), so a new admin RPC cannot be reached with a score key by forgetting this table.
RPC_SCOPES: dict[str, str] = {
    "/rewardserve.v1.RewardService/Score": SCORE,
    "/rewardserve.v1.RewardService/ScoreStream": SCORE,
    "/rewardserve.v1.RewardService/ListModels": SCORE,
    "/rewardserve.v1.BestOfNService/BestOfN": SCORE,
    "/rewardserve.v1.BestOfNService/BestOfNStream": SCORE,
    "/rewardserve.v1.BestOfNService/Rerank": SCORE,
    "/rewardserve.v1.JobService/CreateJob": ADMIN,
    "/rewardserve.v1.JobService/GetJob": ADMIN,
    "/rewardserve.v1.JobService/ListJobs": ADMIN,
    "/rewardserve.v1.JobService/CancelJob": ADMIN,
    "/rewardserve.v1.JobService/ResumeJob": ADMIN,
    "/rewardserve.v1.JobService/WatchJob": ADMIN,
}
# Whole services without a key: health (for probes) and reflection, which describes the API
# and holds no data, as /openapi.json does on REST.
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


def rpc_scope(method: str) -> str | None:
    """The scope declared for a full method name (/package.Service/Method), or None."""
    if method.lstrip("/").partition("/")[0] in OPEN_SERVICES:
        return OPEN
    return RPC_SCOPES.get(method)


def _denying(handler: grpc.RpcMethodHandler, err: ServiceError) -> grpc.RpcMethodHandler:
    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        context.set_trailing_metadata((("error-code", err.code), ("error-field", FIELD)))
        await context.abort(grpc.StatusCode[err.grpc_status], err.message)

    async def deny_stream(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await deny(_request, context)
        yield  # pragma: no cover - makes this an async generator

    # A refused caller's message is never parsed.
    kwargs = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        required = rpc_scope(details.method) or UNDECLARED
        authorization = next(
            (v for k, v in details.invocation_metadata or () if k == "authorization"), None
        )
        try:
            self.keys.authorize(authorization, required)
        except ServiceError as e:
            return _denying(handler, e)
        return handler
