"""POST /v1/best-of-n and POST /v1/rerank."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from rewardserve.http.auth import require
from rewardserve.http.deps import runtime, timeout_s
from rewardserve.http.disconnect import cancel_on_disconnect
from rewardserve.http.errors import SCORING_ERRORS, documented
from rewardserve.schemas.bon import BestOfNRequest, BestOfNResponse, RerankRequest, RerankResponse

router = APIRouter(tags=["best-of-n"], dependencies=[Depends(require("score"))])
ERRORS = documented(*SCORING_ERRORS)


@router.post("/v1/best-of-n", response_model=BestOfNResponse, responses=ERRORS)
async def best_of_n(body: BestOfNRequest, request: Request) -> BestOfNResponse:
    """Sample n candidates per prompt from a policy, score each with a reward model as it
    finishes, and choose one (argmax or soft). A client that disconnects stops generation; the
    whole request is bounded by X-Request-Timeout (default --bon-timeout-s): past it, 504."""
    bon = runtime(request).bon
    return await cancel_on_disconnect(request, bon.run(body, bon.deadline(timeout_s(request))))


@router.post("/v1/rerank", response_model=RerankResponse, responses=ERRORS)
async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
    """Rank the candidates a client brings for one prompt, best first."""
    work = runtime(request).bon.rerank(body, timeout_s(request))
    return await cancel_on_disconnect(request, work)
