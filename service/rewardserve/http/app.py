"""build_app: the FastAPI application with the engine on app.state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from rewardserve import __version__
from rewardserve.config import Settings
from rewardserve.http.auth import Authenticate
from rewardserve.http.errors import install_error_handlers
from rewardserve.http.middleware import BodyGuard, Metrics
from rewardserve.http.routers import bon, compat, health, jobs, models, scoring
from rewardserve.runtime import Runtime


def build_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """The REST app. Without a runtime, the lifespan builds and starts one from settings;
    with one (shared with gRPC), its owner starts and closes it."""
    owns_runtime = runtime is None
    shared = runtime or Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owns_runtime:
            await shared.start()
        try:
            yield
        finally:
            if owns_runtime:
                await shared.close()

    app = FastAPI(title="rewardserve", version=__version__, lifespan=lifespan)
    app.state.runtime = shared
    install_error_handlers(app)
    for module in (health, scoring, bon, models, compat, jobs):
        app.include_router(module.router)
    # Each add wraps the last: Metrics(Authenticate(BodyGuard(app))), so the key is checked
    # before BodyGuard reads a byte of the body.
    app.add_middleware(BodyGuard, limit=settings.max_body_bytes)
    keys, open_paths = shared.keyring, schema_paths(app)
    app.add_middleware(Authenticate, keys=keys, routes=app.router.routes, open_paths=open_paths)
    app.add_middleware(Metrics)
    return app


def schema_paths(app: FastAPI) -> set[str]:
    """FastAPI's own schema and docs routes: open, they describe the API and hold no data."""
    paths = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    return {p for p in paths if p}
