"""Runs REST (uvicorn) and gRPC in one process and one event loop, over one engine.

SIGTERM or SIGINT stops admission on both transports at once (the REST listener closes, gRPC
refuses new RPCs and reports NOT_SERVING), lets in-flight requests finish for up to
`shutdown_grace_s`, then closes the engines and returns, so the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator

import uvicorn

from rewardserve.config import Settings
from rewardserve.grpc.server import GrpcServer
from rewardserve.http.app import build_app
from rewardserve.http.errors import error_response
from rewardserve.jobs.manager import JobManager, service_host
from rewardserve.runtime import Runtime
from rewardserve.schemas.errors import Unavailable

log = logging.getLogger("rewardserve")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: serve() owns the signals for both transports
    (uvicorn's handler would stop REST alone and re-raise the signal at exit, killing the
    process before gRPC and the engines are closed)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _AnswerWhenCancelledAtShutdown:
    """ASGI wrapper: a request still running when the grace ends is cancelled by uvicorn;
    answer it 503 (if nothing was sent yet) instead of letting the cancellation surface as
    a 500 with a traceback in the log."""

    def __init__(self, app: Callable[..., Awaitable[None]], stop: asyncio.Event) -> None:
        self.app, self.stop = app, stop

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        started = False

        async def send_(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except asyncio.CancelledError:
            if scope["type"] != "http" or not self.stop.is_set():
                raise
            if not started:
                err = Unavailable("the server is shutting down; retry on another replica")
                await error_response(err)(scope, receive, send)


async def _first(*aws: asyncio.Future | asyncio.Task) -> None:
    await asyncio.wait(aws, return_when=asyncio.FIRST_COMPLETED)


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
    stop = asyncio.Event()
    app = _AnswerWhenCancelledAtShutdown(build_app(settings, runtime), stop)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    http = _HttpServer(config)
    grpc_server = GrpcServer(settings, runtime) if settings.grpc_enabled else None

    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, _on_signal, sig, stop, http)
    stopping = asyncio.create_task(stop.wait())

    # Transports come up first so /healthz answers and /readyz says 503 while models load.
    http_task = asyncio.create_task(http.serve())
    starting: asyncio.Task[None] | None = None
    try:
        if grpc_server:
            await grpc_server.start()
            await grpc_server.set_serving(False)
            log.info("gRPC listening on %s:%d", settings.host, grpc_server.port)
        starting = asyncio.create_task(runtime.start())
        if runtime.jobs is not None:
            await _tell_jobs_the_endpoints(settings, runtime.jobs, http, http_task, grpc_server)
        await _first(starting, stopping, http_task)
        if starting.done():
            starting.result()  # a start-up model that must load and did not: raise
            if grpc_server:
                await grpc_server.set_serving(True)
            loaded = sorted(runtime.scoring.models) + sorted(runtime.policies.loaded)
            log.info("ready: %s", ", ".join(loaded) or "no models")
            await _first(stopping, http_task)
    finally:
        if starting is not None and not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        await _drain(settings, http, http_task, grpc_server)
        await runtime.close()
        stopping.cancel()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        log.info("stopped")


async def _tell_jobs_the_endpoints(
    settings: Settings,
    jobs: JobManager,
    http: uvicorn.Server,
    http_task: asyncio.Task[None],
    grpc_server: GrpcServer | None,
) -> None:
    """Workers reach this service at the ports actually bound (port 0 picks one), so the
    manager learns them once REST is listening; no worker starts before."""
    while not http.started and not http_task.done():
        await asyncio.sleep(0.01)
    if http_task.done():
        return  # REST failed to start: serve() ends with it
    port = settings.port
    for server in http.servers:
        for sock in server.sockets:
            port = sock.getsockname()[1]
    host = service_host(settings)
    url_host = f"[{host}]" if ":" in host else host
    grpc_address = f"{url_host}:{grpc_server.port}" if grpc_server else ""
    jobs.set_endpoints(f"http://{url_host}:{port}", grpc_address)


def _on_signal(sig: signal.Signals, stop: asyncio.Event, http: uvicorn.Server) -> None:
    if stop.is_set():
        # A second signal: stop waiting for in-flight requests.
        log.warning("%s again: cancelling in-flight requests", sig.name)
        http.force_exit = True
        return
    log.info(
        "%s: refusing new requests, draining in-flight ones (up to %.0f s)",
        sig.name,
        http.config.timeout_graceful_shutdown,
    )
    stop.set()


async def _drain(
    settings: Settings,
    http: uvicorn.Server,
    http_task: asyncio.Task[None],
    grpc_server: GrpcServer | None,
) -> None:
    """Both transports stop admitting at once and drain side by side within the grace."""
    http.should_exit = True  # uvicorn closes its listener, then waits for open requests
    waits: list[asyncio.Future | asyncio.Task] = [http_task]
    if grpc_server:
        await grpc_server.set_serving(False)
        waits.append(asyncio.ensure_future(grpc_server.stop(settings.shutdown_grace_s)))
    results = await asyncio.gather(*waits, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
            log.error("error while draining: %r", r)
