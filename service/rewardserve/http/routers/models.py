"""GET /v1/models and the admin load/unload routes."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from rewardserve.http.auth import require
from rewardserve.http.deps import runtime, scoring
from rewardserve.http.errors import BODY_ERRORS, documented
from rewardserve.schemas.models import LoadRequest, ModelInfo, ModelList

router = APIRouter(tags=["models"])


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses=documented(401, 403),
    dependencies=[Depends(require("score"))],
)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=runtime(request).list_models())


@router.post(
    "/v1/admin/models/load",
    response_model=ModelInfo,
    responses=documented(*BODY_ERRORS, 404, 503),
    dependencies=[Depends(require("admin"))],
)
async def load(body: LoadRequest, request: Request) -> ModelInfo:
    """Load a model from the repository (rescanned first, so new folders are found)."""
    return await scoring(request).load(body.model)


@router.post(
    "/v1/admin/models/unload",
    response_model=ModelInfo,
    responses=documented(*BODY_ERRORS, 404),
    dependencies=[Depends(require("admin"))],
)
async def unload(body: LoadRequest, request: Request) -> ModelInfo:
    """Unload a model; requests still queued for it fail with 503."""
    return await scoring(request).unload(body.model)
