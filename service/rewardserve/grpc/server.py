"""The grpc.aio server: RewardService, the standard health service and reflection."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rewardserve.config import Settings
from rewardserve.grpc.auth import ApiKeyInterceptor
from rewardserve.grpc.decoding import SafeDecoding
from rewardserve.grpc.jobs_servicer import JobServicer
from rewardserve.grpc.servicers import BestOfNServicer, RewardServicer
from rewardserve.runtime import Runtime
from rewardserve.v1 import (
    bon_pb2,
    bon_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)

SERVICE_NAME = scoring_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
BON_SERVICE_NAME = bon_pb2.DESCRIPTOR.services_by_name["BestOfNService"].full_name
JOB_SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name


class GrpcServer:
    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings, self.runtime = settings, runtime
        self.server = grpc.aio.server(
            interceptors=[ApiKeyInterceptor(runtime.keyring), SafeDecoding()],
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ],
        )
        scoring_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(runtime), self.server)
        bon_pb2_grpc.add_BestOfNServiceServicer_to_server(BestOfNServicer(runtime), self.server)
        jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(runtime), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                BON_SERVICE_NAME,
                JOB_SERVICE_NAME,
                health.SERVICE_NAME,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
        self._health_lock = asyncio.Lock()
        self._health_sync: asyncio.Task[None] | None = None
        runtime.scoring.readiness_listeners.append(self._follow_readiness)
        if runtime.jobs is not None:  # its loop dying turns health NOT_SERVING like a model
            runtime.jobs.readiness_listeners.append(self._follow_readiness)

    def _follow_readiness(self) -> None:
        # After start-up, a model failing, recovering or being unloaded flips the health
        # service as it flips /readyz. (Start-up itself is set by the server.)
        if self.runtime.scoring.started:
            self._health_sync = asyncio.ensure_future(self._sync_health())

    async def _sync_health(self) -> None:
        async with self._health_lock:  # read readiness when it is applied, not when asked
            await self._set_all(self.runtime.ready)

    async def start(self) -> None:
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        async with self._health_lock:
            await self._set_all(serving)

    async def _set_all(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME, BON_SERVICE_NAME, JOB_SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)
