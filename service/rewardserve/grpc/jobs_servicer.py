"""JobService: the gRPC mirror of /v1/jobs over the same JobManager."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING

import grpc

from rewardserve.grpc import jobs_convert as convert
from rewardserve.grpc.decoding import Undecodable
from rewardserve.grpc.servicers import streaming, unary
from rewardserve.jobs.enabled import manager_of
from rewardserve.runtime import Runtime
from rewardserve.schemas.jobs import Job
from rewardserve.v1 import jobs_pb2 as pb
from rewardserve.v1 import jobs_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from rewardserve.jobs.manager import JobManager

Request = pb.GetJobRequest | Undecodable


class JobServicer(pb_grpc.JobServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _jobs(self) -> JobManager:
        # Read per call, as REST does: the runtime may set its manager up after the servicer.
        return manager_of(self.runtime)

    async def _on_job(
        self,
        name: str,
        request: Request,
        context: grpc.aio.ServicerContext,
        call: Callable[[JobManager, str], Awaitable[Job]],
    ) -> pb.Job:
        async def work() -> pb.Job:
            manager = self._jobs()
            return convert.job(await call(manager, convert.job_id(request)))

        return await unary(name, context, work)

    async def CreateJob(
        self, request: pb.CreateJobRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.Job:
        """The same job REST's POST /v1/jobs makes; an idempotent replay answers the first job
        (gRPC has no 200/201 to tell them apart)."""

        async def work() -> pb.Job:
            manager = self._jobs()
            job, _created = await manager.create(convert.create_request(request))
            return convert.job(job)

        return await unary("CreateJob", context, work)

    async def GetJob(self, request: Request, context: grpc.aio.ServicerContext) -> pb.Job:
        return await self._on_job("GetJob", request, context, lambda m, i: m.get(i))

    async def CancelJob(self, request: Request, context: grpc.aio.ServicerContext) -> pb.Job:
        return await self._on_job("CancelJob", request, context, lambda m, i: m.cancel(i))

    async def ResumeJob(self, request: Request, context: grpc.aio.ServicerContext) -> pb.Job:
        return await self._on_job("ResumeJob", request, context, lambda m, i: m.resume(i))

    async def ListJobs(
        self, request: pb.ListJobsRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.ListJobsResponse:
        async def work() -> pb.ListJobsResponse:
            manager = self._jobs()
            q = convert.list_request(request)
            page = await manager.list(
                status=q.status, type=q.type, limit=q.limit, page_token=q.page_token
            )
            return convert.job_list(page)

        return await unary("ListJobs", context, work)

    async def WatchJob(
        self, request: pb.WatchJobRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.JobEvent]:
        """Stored events after after_event_id, then live ones, ending after the terminal
        status event. A client that cancels cancels this generator, and aclosing closes the
        manager's iterator with it."""

        async def events() -> AsyncIterator[pb.JobEvent]:
            manager = self._jobs()
            job_id = convert.job_id(request)
            after = convert.after_event_id(request)
            await manager.get(job_id)  # NOT_FOUND before the stream, as REST's 404
            async with aclosing(manager.events(job_id, after)) as stored_then_live:
                async for event in stored_then_live:
                    yield convert.job_event(event)

        async with aclosing(streaming("WatchJob", context, events())) as stream:
            async for event in stream:
                yield event
