"""POST /v1/score."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from rewardserve.http.auth import require
from rewardserve.http.deps import engine, timeout_s
from rewardserve.http.disconnect import cancel_on_disconnect
from rewardserve.schemas.errors import ErrorBody
from rewardserve.schemas.scoring import ScoreRequest, ScoreResponse

router = APIRouter(tags=["scoring"], dependencies=[Depends(require("score"))])
ERRORS = {c: {"model": ErrorBody} for c in (400, 401, 403, 404, 413, 422, 429, 503, 504)}


@router.post("/v1/score", response_model=ScoreResponse, responses=ERRORS)
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    """Rewards for a batch of items; each result carries its `index` in the request."""
    return await cancel_on_disconnect(request, engine(request).score(body, timeout_s(request)))
