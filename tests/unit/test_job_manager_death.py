"""The jobs scheduler loop dying for good turns the service unready on both transports.

A real JobManager, store, Runtime, REST app and gRPC server (in-process) with a FAKE runner:
its poll raises a BaseException subclass, which the loop's supervisor (it restarts the loop
after an Exception, see test_job_manager.test_the_loop_is_supervised) does not catch, so the
loop's task ends. Nothing outside the process can make the real loop end that way, hence a
fake here; tests/integration/test_job_faults.py drives the supervised restarts of the real
service from outside (its jobs table taken away under it).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_job_manager import FakeRunner, settings_for, until, validate  # its harness

from rewardserve.grpc.server import GrpcServer
from rewardserve.http.app import build_app
from rewardserve.jobs.manager import JobManager
from rewardserve.jobs.runners.base import WorkerState
from rewardserve.runtime import Runtime
from rewardserve.schemas.jobs import JobCreate


class LoopKiller(BaseException):
    """Not an Exception: what a supervisor that catches Exception lets through."""


class DeadlyRunner(FakeRunner):
    """Polling any worker ends the scheduler loop."""

    async def poll(self, ref: str) -> WorkerState:
        raise LoopKiller(f"polling {ref}")


async def test_a_loop_that_dies_for_good_turns_readyz_and_grpc_health_off(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path, host="127.0.0.1", grpc_port=0)  # no jobs of its own
    runtime = Runtime(settings)
    manager = JobManager(settings, runtime, runner=DeadlyRunner(), validate=validate)
    runtime.jobs = manager  # before the gRPC server, which follows its readiness
    grpc_server = GrpcServer(settings, runtime)
    await runtime.scoring.start()
    await manager.start()
    await grpc_server.start()
    await grpc_server.set_serving(runtime.ready)
    transport = httpx.ASGITransport(app=build_app(settings, runtime))
    try:
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://t") as client,
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_server.port}") as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)

            async def status() -> int:
                req = health_pb2.HealthCheckRequest(service="")
                return (await health.Check(req, timeout=5)).status  # type: ignore[no-any-return]

            assert (await client.get("/readyz")).status_code == 200
            assert await status() == health_pb2.HealthCheckResponse.SERVING

            await manager.create(JobCreate(type="ppo", config={}, prompts=["hi"]))
            manager.set_endpoints("http://127.0.0.1:1", "127.0.0.1:2")  # launch, then poll
            await until(lambda: not manager.ready)
            assert manager.gave_up
            assert manager.failure is not None
            assert "LoopKiller" in manager.failure and "gave up" in manager.failure

            r = await client.get("/readyz")
            assert r.status_code == 503
            assert r.json()["failed"] == {"jobs": manager.failure}
            deadline = time.monotonic() + 10
            while await status() != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "gRPC health stayed SERVING"
                await asyncio.sleep(0.02)

            await asyncio.sleep(0.2)  # given up: no restart brings it back
            assert not manager.ready and (await client.get("/readyz")).status_code == 503
    finally:
        await grpc_server.stop(0)
        await manager.close()
        await runtime.scoring.close()
