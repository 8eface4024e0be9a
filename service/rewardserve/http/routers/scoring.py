"""POST /v1/score."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from rewardserve.http.auth import require
from rewardserve.http.deps import scoring, timeout_s
from rewardserve.http.disconnect import cancel_on_disconnect
from rewardserve.http.errors import SCORING_ERRORS, documented
from rewardserve.schemas.scoring import ScoreRequest, ScoreResponse

router = APIRouter(tags=["scoring"], dependencies=[Depends(require("score"))])
ERRORS = documented(*SCORING_ERRORS)


@router.post("/v1/score", response_model=ScoreResponse, responses=ERRORS)
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    """Rewards for a batch of items; each result carries its `index` in the request."""
    return await cancel_on_disconnect(request, scoring(request).score(body, timeout_s(request)))
