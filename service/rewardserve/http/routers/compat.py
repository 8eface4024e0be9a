"""Drop-in routes for RLHF frameworks that expect another server's API.

- POST /get_reward: OpenRLHF's remote reward model (`--remote_rm_url`).
- POST /classify: vLLM's classify API, which verl's reward loop posts to.
Texts arrive already rendered by the framework, so they are scored as raw text.
"""

from __future__ import annotations

import math
import time
import uuid

from fastapi import APIRouter, Depends, Request

from rewardserve.http.auth import require
from rewardserve.http.deps import engine, timeout_s
from rewardserve.http.disconnect import cancel_on_disconnect
from rewardserve.http.errors import SCORING_ERRORS, documented
from rewardserve.schemas.compat import (
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyUsage,
    OpenRLHFRequest,
    OpenRLHFResponse,
)
from rewardserve.schemas.errors import InvalidArgument

router = APIRouter(tags=["compat"], dependencies=[Depends(require("score"))])
ERRORS = documented(*SCORING_ERRORS)


@router.post("/get_reward", response_model=OpenRLHFResponse, responses=ERRORS)
async def get_reward(body: OpenRLHFRequest, request: Request) -> OpenRLHFResponse:
    """OpenRLHF: `rewards` and `scores` are the raw rewards of each query."""
    if body.prompts is not None and len(body.prompts) != len(body.query):
        raise InvalidArgument(
            f"{len(body.prompts)} prompts for {len(body.query)} queries", field="prompts"
        )
    work = engine(request).score_texts(None, body.query, timeout_s(request), field_of="query")
    _, _, rewards = await cancel_on_disconnect(request, work)
    return OpenRLHFResponse(rewards=rewards, scores=rewards, extra_logs={})


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS)
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    """vLLM classify: probs = [raw reward], or [sigmoid(reward)] with use_activation."""
    work = engine(request).score_texts(body.model, body.texts, timeout_s(request), field_of="input")
    model, encoded, rewards = await cancel_on_disconnect(request, work)
    probs = [1 / (1 + math.exp(-r)) if body.sigmoid else r for r in rewards]
    tokens = sum(len(e) for e in encoded)
    return ClassifyResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model.scorer.name,
        data=[ClassifyData(index=i, probs=[p]) for i, p in enumerate(probs)],
        usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
