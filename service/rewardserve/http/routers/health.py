"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rewardserve.http.auth import require
from rewardserve.http.deps import engine

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """200 once every start-up model is loaded; 503 before."""
    eng = engine(request)
    body = {"ready": eng.ready, "loaded": sorted(eng.models), "expected": eng.expected}
    return JSONResponse(body, status_code=200 if eng.ready else 503)


@router.get("/metrics", dependencies=[Depends(require("any"))])
async def prometheus() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
