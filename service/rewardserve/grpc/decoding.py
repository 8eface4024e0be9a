"""Undecodable request messages become INVALID_ARGUMENT instead of grpcio's UNKNOWN.

grpcio calls the deserializer before any servicer code runs and turns its exception into
UNKNOWN; this interceptor swaps in a deserializer that returns a marker the servicer refuses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class Undecodable:
    reason: str


def _safe(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def wrapped(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, UnicodeDecodeError) as e:
            return Undecodable(str(e) or type(e).__name__)

    return wrapped


class SafeDecoding(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith("/rewardserve."):
            return handler
        return handler._replace(request_deserializer=_safe(handler.request_deserializer))
