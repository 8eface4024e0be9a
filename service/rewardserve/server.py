"""Runs REST (uvicorn) and gRPC in one process and one event loop, over one engine."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from rewardserve.config import Settings
from rewardserve.grpc.server import GrpcServer
from rewardserve.http.app import build_app
from rewardserve.runtime import Runtime

log = logging.getLogger("rewardserve")


async def serve(settings: Settings) -> None:
    runtime = Runtime(settings)
    app = build_app(settings, runtime)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    http = uvicorn.Server(config)
    grpc_server = GrpcServer(settings, runtime) if settings.grpc_enabled else None

    # Transports come up first so /healthz answers and /readyz says 503 while models load.
    http_task = asyncio.create_task(http.serve())
    if grpc_server:
        await grpc_server.start()
        await grpc_server.set_serving(False)
        log.info("gRPC listening on %s:%d", settings.host, grpc_server.port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: setattr(http, "should_exit", True))
    try:
        await runtime.start()
        if grpc_server:
            await grpc_server.set_serving(True)
        loaded = sorted(runtime.scoring.models) + sorted(runtime.policies.loaded)
        log.info("ready: %s", ", ".join(loaded) or "no models")
        await http_task
    finally:
        http.should_exit = True
        if grpc_server:
            await grpc_server.stop()
        await runtime.close()
        if not http_task.done():
            await http_task
