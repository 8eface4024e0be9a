"""Drop-in routes for RLHF frameworks that expect another server's API.

- POST /get_reward: OpenRLHF's remote reward model (`--remote_rm_url`).
- POST /classify: vLLM's classify API, which verl's reward loop posts to (vLLM engine).
- POST /v1/embeddings: OpenAI embeddings, which verl's reward loop posts to (SGLang engine).
Every route takes a reward model's name or alias in `model` (verl sends its model path).
Texts arrive already rendered by the framework, so they are scored as raw text.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid

from fastapi import APIRouter, Depends, Request

from rewardserve.engine.composite import CompositeReward, openrlhf_items
from rewardserve.http.auth import require
from rewardserve.http.deps import scoring, timeout_s
from rewardserve.http.disconnect import cancel_on_disconnect
from rewardserve.http.errors import SCORING_ERRORS, documented
from rewardserve.schemas.compat import (
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyUsage,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    OpenRLHFRequest,
    OpenRLHFResponse,
    sigmoid,
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
    engine = scoring(request)
    composite = engine.composite(None)
    if composite is not None:  # labels mean something to it: its exact_match parts' answers
        return await _composite_reward(request, composite, body)
    work = engine.score_texts(None, body.query, timeout_s(request), field_of="query")
    _, _, rewards = await cancel_on_disconnect(request, work)
    return OpenRLHFResponse(rewards=rewards, scores=rewards, extra_logs={})


async def _composite_reward(
    request: Request, composite: CompositeReward, body: OpenRLHFRequest
) -> OpenRLHFResponse:
    """A composite default: rewards are its totals, extra_logs its parts (OpenRLHF logs
    them beside the reward)."""
    items, views = openrlhf_items(body.query, body.prompts, body.labels)
    timeout = timeout_s(request)
    deadline = None if timeout is None else time.monotonic() + timeout
    work = composite.evaluate(
        scoring(request), items, deadline=deadline, field_of="query", views=views
    )
    results = await cancel_on_disconnect(request, work)
    rewards = [r.reward for r in results]
    logs = {name: [(r.parts or {})[name] for r in results] for name in composite.spec.names}
    return OpenRLHFResponse(rewards=rewards, scores=rewards, extra_logs=logs)


async def _score(
    request: Request, body: ClassifyRequest | EmbeddingRequest
) -> tuple[str, int, list[float]]:
    """(model name, prompt tokens, raw rewards) of a pooling-style request's texts."""
    work = scoring(request).score_texts(
        body.model, body.texts, timeout_s(request), field_of="input"
    )
    model, encoded, rewards = await cancel_on_disconnect(request, work)
    return model.scorer.name, sum(len(e) for e in encoded), rewards


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS)
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    """vLLM classify: probs = [sigmoid(reward)] unless use_activation is false (then the raw
    reward), vLLM's default for a one-label classifier."""
    model, tokens, rewards = await _score(request, body)
    probs = [sigmoid(r) for r in rewards] if body.activated else rewards
    return ClassifyResponse(
        id=f"classify-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        data=[ClassifyData(index=i, probs=[p]) for i, p in enumerate(probs)],
        usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    """OpenAI embeddings shape over a reward model: embedding = [raw reward] (SGLang's
    reward-model output, which verl's SGLang path reads as data[-1].embedding[-1])."""
    model, tokens, rewards = await _score(request, body)
    return EmbeddingResponse(
        data=[
            EmbeddingData(index=i, embedding=_encode([r], body.encoding_format))
            for i, r in enumerate(rewards)
        ],
        model=model,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
