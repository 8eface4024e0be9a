"""Runs REST (uvicorn) and gRPC in one process and one event loop, over one engine."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal

import uvicorn

from rewardserve.config import Settings
from rewardserve.grpc.server import GrpcServer
from rewardserve.http.app import build_app
from rewardserve.runtime import Runtime

log = logging.getLogger("rewardserve")


def is_loopback(host: str) -> bool:
    """Whether binding `host` reaches this machine only. A name other than localhost counts
    as exposed: what it resolves to can change."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse (exit non-zero, before any model loads) to serve a non-loopback address open."""
    if settings.api_keys or is_loopback(settings.host):
        return
    if settings.allow_insecure:
        log.warning("serving %s without API keys (--allow-insecure): open to all", settings.host)
        return
    raise SystemExit(
        f"rewardserve: refusing to serve {settings.host} without API keys: anyone who can "
        "reach it could score and load or unload models. Set --api-keys "
        "(REWARDSERVE_API_KEYS), bind a loopback --host, or pass --allow-insecure to serve "
        "it open anyway."
    )


async def serve(settings: Settings) -> None:
    check_exposure(settings)
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
