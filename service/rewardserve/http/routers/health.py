"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from rewardserve.http.auth import require
from rewardserve.http.deps import runtime
from rewardserve.http.errors import documented

router = APIRouter(tags=["health"])


class Readiness(BaseModel):
    ready: bool
    loaded: list[str]
    """Models loaded now (reward models, then policies)."""
    expected: list[str]
    """Models start-up loads; a model that failed to load is left out (GET /v1/models)."""
    failed: dict[str, str] = {}
    """Loaded models that cannot serve right now (their batcher loop died), and why."""


@router.get("/healthz", dependencies=[Depends(require("open"))])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready yet"}},
    dependencies=[Depends(require("open"))],
)
async def readyz(request: Request) -> JSONResponse:
    """200 once every start-up model (reward models and policies) is loaded; 503 before, and
    while a loaded model has failed (`failed` names it and says why)."""
    rt = runtime(request)
    body = Readiness(
        ready=rt.ready,
        loaded=sorted(rt.scoring.models) + sorted(rt.policies.loaded),
        expected=rt.scoring.expected + rt.policies.expected,
        failed=rt.failures(),
    )
    return JSONResponse(body.model_dump(), status_code=200 if rt.ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}},
        **documented(401, 403),
    },
    dependencies=[Depends(require("any"))],
)
async def prometheus() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
