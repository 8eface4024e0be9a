"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rewardserve.http.auth import require
from rewardserve.http.deps import runtime

router = APIRouter(tags=["health"])


@router.get("/healthz", dependencies=[Depends(require("open"))])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", dependencies=[Depends(require("open"))])
async def readyz(request: Request) -> JSONResponse:
    """200 once every start-up model (reward models and policies) is loaded; 503 before, and
    while a loaded model has failed (`failed` names it and says why)."""
    rt = runtime(request)
    body = {
        "ready": rt.ready,
        "loaded": sorted(rt.scoring.models) + sorted(rt.policies.loaded),
        "expected": rt.scoring.expected + rt.policies.expected,
        "failed": rt.failures(),
    }
    return JSONResponse(body, status_code=200 if rt.ready else 503)


@router.get("/metrics", dependencies=[Depends(require("any"))])
async def prometheus() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
