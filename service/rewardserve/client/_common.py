"""What the sync and async clients share: request building, response reading, retry policy."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeAlias

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel, ValidationError

from rewardserve.client.errors import DeadlineExceeded, InvalidArgument, RewardServeError
from rewardserve.schemas.bon import BestOfNResponse, PromptInput, RerankResponse
from rewardserve.schemas.errors import field_path
from rewardserve.schemas.models import ModelInfo
from rewardserve.schemas.scoring import ChatMessage, ScoreItem, ScoreResponse, ScoreResult, Usage
from rewardserve.v1 import bon_pb2 as bon_pb
from rewardserve.v1 import scoring_pb2 as pb

ItemLike: TypeAlias = ScoreItem | Mapping[str, Any] | str
"""A ScoreItem, its dict form ({"prompt", "response"} | {"messages"} | {"text"}) or raw text."""
PromptLike: TypeAlias = PromptInput | Mapping[str, Any] | str
"""A PromptInput, its dict form ({"prompt"} | {"messages"}) or the prompt text."""
MessagesLike: TypeAlias = Sequence[ChatMessage | Mapping[str, Any]]

DEFAULT_TIMEOUT_S = 60.0


class Closing:
    """A context manager that calls close() on exit."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def channel_target(target: str) -> tuple[str, bool]:
    """'host:port', 'grpc://host:port' (plaintext) or 'grpcs://host:port' (TLS) ->
    (address, secure)."""
    for scheme, secure in (("grpcs://", True), ("grpc://", False)):
        if target.startswith(scheme):
            return target[len(scheme) :].rstrip("/"), secure
    if "://" in target:
        raise ValueError(f"'{target}': use host:port, grpc://host:port or grpcs://host:port")
    return target, False


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The bearer token the server's ApiKeyInterceptor reads (grpc/auth.py)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


# ---- requests --------------------------------------------------------------------------------


def _validated(model: type[BaseModel], data: Any, loc: tuple[str | int, ...]) -> Any:
    """A dict checked by the server's own schema, so the field named is the server's."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        path = field_path((*loc, *first.get("loc", ())))
        raise InvalidArgument(f"{path}: {first.get('msg', 'invalid value')}", field=path) from None


def _messages_pb(messages: MessagesLike) -> pb.Conversation:
    out = []
    for m in messages:
        role, content = (
            (m.role, m.content) if isinstance(m, ChatMessage) else (m["role"], m["content"])
        )
        out.append(pb.ChatMessage(role=role, content=content))
    return pb.Conversation(messages=out)


def score_item_pb(item: ItemLike, index: int) -> pb.ScoreItem:
    """Raw text and ScoreItem objects go as they are (the server validates them, naming the
    field); dicts are validated here first, because a wrong type cannot even become a proto."""
    if isinstance(item, str):
        return pb.ScoreItem(text=item)
    if not isinstance(item, ScoreItem):
        item = _validated(ScoreItem, item, ("items", index))
    label = item.label or ""
    if item.text is not None:
        return pb.ScoreItem(text=item.text, label=label)
    if item.messages is not None:
        return pb.ScoreItem(conversation=_messages_pb(item.messages), label=label)
    return pb.ScoreItem(
        pair=pb.PromptResponse(prompt=item.prompt or "", response=item.response or ""),
        label=label,
    )


def score_request(
    items: Sequence[ItemLike] | str,
    model: str | None,
    weights: Mapping[str, float] | None = None,
) -> pb.ScoreRequest:
    if isinstance(items, str | ScoreItem | Mapping):
        items = [items]  # type: ignore[list-item]
    return pb.ScoreRequest(
        model=model or "",
        items=[score_item_pb(it, i) for i, it in enumerate(items)],
        weights=dict(weights or {}),
    )


def prompt_dict(prompt: PromptLike, loc: tuple[str | int, ...]) -> dict[str, Any]:
    """A prompt in the JSON form of PromptInput (the Conversation wraps the message list)."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if not isinstance(prompt, PromptInput):
        prompt = _validated(PromptInput, prompt, loc)
    label = {"label": prompt.label} if prompt.label is not None else {}
    if prompt.messages is not None:
        return {"messages": {"messages": [m.model_dump() for m in prompt.messages]}} | label
    return {"prompt": prompt.prompt} | label


def build(message: type[Message], fields: Mapping[str, Any]) -> Any:
    """A request proto from keyword fields; None means 'not set' (the server's default)."""
    data = {k: v for k, v in fields.items() if v is not None}
    known = message.DESCRIPTOR.fields_by_name
    for name in data:
        if name not in known:
            raise InvalidArgument(f"{name}: not a field of {message.__name__}", field=name)
    try:
        return json_format.ParseDict(data, message())
    except json_format.ParseError as e:
        raise InvalidArgument(str(e), field=None) from None


def bon_request(
    prompts: Sequence[PromptLike] | str, fields: Mapping[str, Any]
) -> bon_pb.BestOfNRequest:
    if isinstance(prompts, str | PromptInput | Mapping):
        prompts = [prompts]  # type: ignore[list-item]
    listed = [prompt_dict(p, ("prompts", i)) for i, p in enumerate(prompts)]
    return build(bon_pb.BestOfNRequest, {**fields, "prompts": listed})


def rerank_request(
    candidates: Sequence[str],
    prompt: str | None,
    messages: MessagesLike | None,
    fields: Mapping[str, Any],
) -> bon_pb.RerankRequest:
    if (prompt is None) == (messages is None):
        raise InvalidArgument("give exactly one of: prompt, messages", field="prompt")
    context: dict[str, Any] = {"prompt": prompt} if prompt is not None else {}
    if messages is not None:
        msgs = [
            _validated(ChatMessage, m, ("messages", i)) if not isinstance(m, ChatMessage) else m
            for i, m in enumerate(messages)
        ]
        context = {"messages": {"messages": [m.model_dump() for m in msgs]}}
    return build(bon_pb.RerankRequest, {**fields, **context, "candidates": list(candidates)})


# ---- responses -------------------------------------------------------------------------------


def score_response(resp: pb.ScoreResponse) -> ScoreResponse:
    # built field by field: this is the PPO loop's hot path, and no JSON detour loses a bit
    return ScoreResponse.model_construct(
        model=resp.model,
        results=[
            ScoreResult.model_construct(
                index=r.index,
                reward=r.reward,
                normalized_reward=r.normalized_reward,
                truncated=r.truncated,
                tokens=r.tokens,
                parts=dict(r.parts) or None,
                uncertainty=r.uncertainty if r.HasField("uncertainty") else None,
                members=list(r.members) or None,
            )
            for r in resp.results
        ],
        usage=Usage.model_construct(
            prompt_tokens=resp.usage.prompt_tokens, total_tokens=resp.usage.total_tokens
        ),
    )


def _as_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _single_model_members(candidate: dict[str, Any]) -> dict[str, Any]:
    # proto3 cannot tell an empty repeated field from an absent one: no members is a
    # single reward model, null in the schema as over REST
    candidate["members"] = candidate.get("members") or None
    return candidate


def bon_response(resp: bon_pb.BestOfNResponse) -> BestOfNResponse:
    data = _as_dict(resp)
    for result in data["results"]:
        result.setdefault("kl_bound", None)
        result["kl_bound_note"] = result.get("kl_bound_note") or None
        for cand in [result["chosen"], *result["candidates"]]:
            _single_model_members(cand)
    return BestOfNResponse.model_validate(data)


def rerank_response(resp: bon_pb.RerankResponse) -> RerankResponse:
    data = _as_dict(resp)
    for cand in data["results"]:
        _single_model_members(cand)
    return RerankResponse.model_validate(data)


def models_response(resp: pb.ListModelsResponse) -> list[ModelInfo]:
    out = []
    for m in resp.models:
        data = _as_dict(m)
        data["error"] = data.get("error") or None
        out.append(ModelInfo.model_validate(data))
    return out


# ---- retries ---------------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    """Retries of UNAVAILABLE and of RESOURCE_EXHAUSTED that carries a retry-after (an
    overloaded server; a request too large is not retried), bounded by `max_attempts` and by
    the call's deadline: a wait that would end past the deadline is not started.

    The n-th retry waits max(retry-after, min(max_backoff_s, initial_backoff_s * multiplier
    ** (n - 1))), stretched by a random factor in [1, 1 + jitter] so that clients refused
    together do not all come back together.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    @staticmethod
    def retryable(err: RewardServeError) -> bool:
        if err.code == grpc.StatusCode.UNAVAILABLE:
            return True
        return err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.retry_after is not None

    def delay(self, err: RewardServeError, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up with `err`."""
        if attempt >= self.max_attempts or not self.retryable(err):
            return None
        backoff = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        wait = max(err.retry_after or 0.0, backoff) * (1 + self.jitter * self.rng.random())
        if time.monotonic() + wait >= deadline:
            return None
        return wait


def remaining(deadline: float, attempt: int, last: RewardServeError | None) -> float:
    """Seconds left for the next attempt; DeadlineExceeded when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(
            "the call's deadline passed"
            + (f" after {attempt - 1} attempts (last: {last.message})" if last else ""),
            attempts=max(1, attempt - 1),
        )
    return left


def give_up(err: RewardServeError, attempt: int) -> RewardServeError:
    err.attempts = attempt
    return err
