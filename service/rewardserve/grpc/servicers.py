"""RewardService: each RPC converts, calls the engine, converts back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TypeVar

import grpc

from rewardserve import metrics
from rewardserve.grpc import convert
from rewardserve.runtime import Runtime
from rewardserve.schemas.bon import BestOfNResponse
from rewardserve.schemas.errors import Overloaded, ServiceError
from rewardserve.v1 import bon_pb2 as bon_pb
from rewardserve.v1 import bon_pb2_grpc as bon_grpc
from rewardserve.v1 import scoring_pb2 as pb
from rewardserve.v1 import scoring_pb2_grpc as pb_grpc

T = TypeVar("T")


async def abort_with(context: grpc.aio.ServicerContext, err: ServiceError) -> None:
    """The REST error shape as a gRPC status; field and retry hint go in trailing metadata."""
    trailers: list[tuple[str, str]] = [("error-code", err.code)]
    if err.field:
        trailers.append(("error-field", err.field))
    if isinstance(err, Overloaded):
        trailers.append(("retry-after", str(max(1, round(err.retry_after_s)))))
    context.set_trailing_metadata(tuple(trailers))
    await context.abort(grpc.StatusCode[err.grpc_status], err.message)


async def unary(
    name: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]
) -> T:
    """Run a unary RPC's work: errors become the matching status, every call is counted."""
    started, code = time.perf_counter(), "OK"
    try:
        return await work()
    except ServiceError as e:
        code = e.grpc_status
        await abort_with(context, e)
        raise  # unreachable: abort raises
    finally:
        metrics.REQUESTS.labels("grpc", name, code).inc()
        metrics.LATENCY.labels("grpc", name).observe(time.perf_counter() - started)


async def streaming(
    name: str, context: grpc.aio.ServicerContext, work: AsyncGenerator[T, None]
) -> AsyncIterator[T]:
    """Run a server-streaming RPC's work: an error ends the stream with the matching status,
    every call is counted once. Closing this closes `work` (a cancelled call stops it)."""
    code = "OK"
    try:
        async with aclosing(work) as items:
            async for item in items:
                yield item
    except ServiceError as e:
        code = e.grpc_status
        await abort_with(context, e)
    finally:
        metrics.REQUESTS.labels("grpc", name, code).inc()


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining > 0 else None


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as time.monotonic(), even when already passed (None: none set)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RewardServicer(pb_grpc.RewardServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.scoring = runtime.scoring

    async def _score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        req = convert.score_request(request)
        return convert.score_response(await self.scoring.score(req, _timeout(context)))

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        return await unary("Score", context, lambda: self._score(request, context))

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResponse]:
        """Requests are scored concurrently as they arrive; responses keep request order.
        The first bad request ends the stream with its status."""
        inflight: asyncio.Queue[asyncio.Task[pb.ScoreResponse] | None] = asyncio.Queue(maxsize=64)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await inflight.put(asyncio.create_task(self._score(req, context)))
            finally:
                await inflight.put(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await inflight.get()) is not None:
                try:
                    response = await task
                except ServiceError as e:
                    metrics.REQUESTS.labels("grpc", "ScoreStream", e.grpc_status).inc()
                    await abort_with(context, e)
                metrics.REQUESTS.labels("grpc", "ScoreStream", "OK").inc()
                yield response
        finally:
            reader.cancel()
            while not inflight.empty():
                if (t := inflight.get_nowait()) is not None:
                    t.cancel()

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        metrics.REQUESTS.labels("grpc", "ListModels", "OK").inc()
        return pb.ListModelsResponse(
            models=[convert.model_info(m) for m in self.runtime.list_models()]
        )


class BestOfNServicer(bon_grpc.BestOfNServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.bon = runtime.bon

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        """One deadline from arrival: the client's, else --bon-timeout-s."""
        return _deadline(context) or self.bon.deadline(None)

    async def BestOfN(
        self, request: bon_pb.BestOfNRequest, context: grpc.aio.ServicerContext
    ) -> bon_pb.BestOfNResponse:
        deadline = self._deadline(context)

        async def work() -> bon_pb.BestOfNResponse:
            req = convert.bon_request(request)
            return convert.bon_response(await self.bon.run(req, deadline))

        return await unary("BestOfN", context, work)

    async def BestOfNStream(
        self, request: bon_pb.BestOfNRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bon_pb.BestOfNEvent]:
        """Each candidate as soon as it is scored, then the result."""
        deadline = self._deadline(context)

        async def events() -> AsyncIterator[bon_pb.BestOfNEvent]:
            async for event in self.bon.stream(convert.bon_request(request), deadline):
                if isinstance(event, BestOfNResponse):
                    yield bon_pb.BestOfNEvent(result=convert.bon_response(event))
                else:
                    yield convert.bon_event(event)

        async with aclosing(streaming("BestOfNStream", context, events())) as stream:
            async for event in stream:
                yield event

    async def Rerank(
        self, request: bon_pb.RerankRequest, context: grpc.aio.ServicerContext
    ) -> bon_pb.RerankResponse:
        deadline = _deadline(context)  # none: rerank's own default, a scoring request's

        async def work() -> bon_pb.RerankResponse:
            req = convert.rerank_request(request)
            return convert.rerank_response(await self.bon.rerank(req, deadline=deadline))

        return await unary("Rerank", context, work)
