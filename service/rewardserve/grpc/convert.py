"""Protobuf <-> schema objects. Requests go through the same pydantic validation as REST,
so both transports refuse the same inputs with the same field names."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from rewardserve.grpc.decoding import Undecodable
from rewardserve.schemas.errors import InvalidArgument, from_validation_error
from rewardserve.schemas.models import ModelInfo
from rewardserve.schemas.scoring import ScoreRequest, ScoreResponse
from rewardserve.v1 import scoring_pb2 as pb


def _item(item: pb.ScoreItem) -> dict[str, Any]:
    form = item.WhichOneof("input")
    if form == "pair":
        return {"prompt": item.pair.prompt, "response": item.pair.response}
    if form == "conversation":
        return {
            "messages": [{"role": m.role, "content": m.content} for m in item.conversation.messages]
        }
    if form == "text":
        return {"text": item.text}
    return {}


def score_request(msg: pb.ScoreRequest | Undecodable) -> ScoreRequest:
    if isinstance(msg, Undecodable):
        raise InvalidArgument(
            f"the request message could not be decoded: {msg.reason}", field="body"
        )
    raw = {"model": msg.model or None, "items": [_item(i) for i in msg.items]}
    try:
        return ScoreRequest.model_validate(raw)
    except ValidationError as e:
        raise from_validation_error(e) from None


def score_response(resp: ScoreResponse) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        model=resp.model,
        results=[
            pb.ScoreResult(
                index=r.index,
                reward=r.reward,
                normalized_reward=r.normalized_reward,
                truncated=r.truncated,
                tokens=r.tokens,
            )
            for r in resp.results
        ],
        usage=pb.Usage(
            prompt_tokens=resp.usage.prompt_tokens, total_tokens=resp.usage.total_tokens
        ),
    )


def model_info(m: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        id=m.id,
        kind=m.kind,
        status=m.status,
        default=m.default,
        max_length=m.max_length,
        description=m.description,
        error=m.error or "",
    )
