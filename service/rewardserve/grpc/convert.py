"""Protobuf <-> schema objects. Requests go through the same pydantic validation as REST,
so both transports refuse the same inputs with the same field names."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel, ValidationError

from rewardserve.bon.service import ScoredCandidate
from rewardserve.grpc.decoding import Undecodable
from rewardserve.schemas.bon import BestOfNRequest, BestOfNResponse, RerankRequest, RerankResponse
from rewardserve.schemas.errors import InvalidArgument, from_validation_error
from rewardserve.schemas.evaluation import EvaluationSummary
from rewardserve.schemas.models import ModelInfo
from rewardserve.schemas.scoring import ScoreRequest, ScoreResponse
from rewardserve.v1 import bon_pb2 as bon_pb
from rewardserve.v1 import scoring_pb2 as pb


def _item(item: pb.ScoreItem) -> dict[str, Any]:
    # proto3 has no absent string: an empty label is no label
    return _form(item) | ({"label": item.label} if item.label else {})


def _form(item: pb.ScoreItem) -> dict[str, Any]:
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
    raw = {
        "model": msg.model or None,
        "items": [_item(i) for i in msg.items],
        "weights": dict(msg.weights) or None,  # an empty map is no override, as REST's absent
    }
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
                parts=r.parts,
                uncertainty=r.uncertainty,
                members=r.members,
            )
            for r in resp.results
        ],
        usage=pb.Usage(
            prompt_tokens=resp.usage.prompt_tokens, total_tokens=resp.usage.total_tokens
        ),
    )


def model_evaluation(e: EvaluationSummary) -> pb.ModelEvaluation:
    return pb.ModelEvaluation(
        data=e.data, pairs=e.pairs, accuracy=e.accuracy, ci_low=e.ci_low, ci_high=e.ci_high,
        ece=e.ece, evaluated_at=e.evaluated_at.isoformat(),
    )  # fmt: skip


def model_info(m: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        id=m.id,
        kind=m.kind,
        status=m.status,
        default=m.default,
        max_length=m.max_length,
        description=m.description,
        error=m.error or "",
        aliases=m.aliases,
        evaluation=None if m.evaluation is None else model_evaluation(m.evaluation),
        members=m.members,
    )


# ---- Best-of-N and rerank: the messages' JSON form is the REST body ---------------------


def _as_dict(msg: Message | Undecodable) -> dict[str, Any]:
    if isinstance(msg, Undecodable):
        raise InvalidArgument(
            f"the request message could not be decoded: {msg.reason}", field="body"
        )
    data = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    # Conversation wraps the message list; REST carries the list itself.
    for holder in [data, *data.get("prompts", [])]:
        if "messages" in holder:
            holder["messages"] = holder["messages"].get("messages", [])
    return data


def _validated(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


def bon_request(msg: bon_pb.BestOfNRequest | Undecodable) -> BestOfNRequest:
    data = _as_dict(msg)
    data.setdefault("prompts", [])  # absent when empty: let validation name the field
    if not data["prompts"]:
        raise InvalidArgument("give at least one prompt", field="prompts")
    return _validated(BestOfNRequest, data)


def rerank_request(msg: bon_pb.RerankRequest | Undecodable) -> RerankRequest:
    return _validated(RerankRequest, _as_dict(msg))


def _to_pb(obj: BaseModel, message: Message) -> Any:
    return json_format.ParseDict(obj.model_dump(), message)


def bon_response(resp: BestOfNResponse) -> bon_pb.BestOfNResponse:
    return _to_pb(resp, bon_pb.BestOfNResponse())


def bon_event(event: ScoredCandidate) -> bon_pb.BestOfNEvent:
    scored = bon_pb.ScoredCandidate(
        prompt_index=event.prompt_index, candidate=_to_pb(event.candidate, bon_pb.Candidate())
    )
    return bon_pb.BestOfNEvent(candidate=scored)


def rerank_response(resp: RerankResponse) -> bon_pb.RerankResponse:
    return _to_pb(resp, bon_pb.RerankResponse())
