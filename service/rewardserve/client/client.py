"""RewardClient (blocking) and AsyncRewardClient (asyncio): the same methods, the same
results, over rewardserve's gRPC API (rewardserve.v1)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from rewardserve.client import _common as c
from rewardserve.client.errors import RewardServeError, from_rpc_error
from rewardserve.schemas.bon import BestOfNResponse, RerankResponse
from rewardserve.schemas.models import ModelInfo
from rewardserve.schemas.scoring import ScoreResponse
from rewardserve.v1 import bon_pb2_grpc, scoring_pb2_grpc
from rewardserve.v1 import scoring_pb2 as pb


class _Base:
    _channels: Any = grpc  # the module whose insecure_channel / secure_channel are used

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        timeout: float = c.DEFAULT_TIMEOUT_S,
        retry: c.RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """`target`: host:port, grpc://host:port or grpcs://host:port (TLS, the system's
        roots unless `credentials` are given). `api_key` goes as a bearer token. `timeout`:
        each call's default deadline in seconds, retries included. `retry`: RetryPolicy()
        unless given (RetryPolicy(max_attempts=1) never retries)."""
        address, secure = c.channel_target(target)
        if secure and credentials is None:
            credentials = grpc.ssl_channel_credentials()
        self.target, self.timeout = address, timeout
        self.retry = retry or c.RetryPolicy()
        self._metadata = c.auth_metadata(api_key)
        opts = list(options)
        self.channel = (
            self._channels.secure_channel(address, credentials, opts)
            if credentials is not None
            else self._channels.insecure_channel(address, opts)
        )
        self._scoring = scoring_pb2_grpc.RewardServiceStub(self.channel)
        self._bon = bon_pb2_grpc.BestOfNServiceStub(self.channel)

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)


class RewardClient(_Base, c.Closing):
    """Blocking client. Every method takes its own `timeout` (seconds, retries included);
    without one the client's default applies.

        with RewardClient("127.0.0.1:50051", api_key="...") as client:
            rewards = client.score([{"prompt": "Hi", "response": "Hello!"}]).results
    """

    def _call(self, rpc: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        deadline, attempt, last = self._deadline(timeout), 1, None
        while True:
            left = c.remaining(deadline, attempt, last)
            try:
                return rpc(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as e:
                last = from_rpc_error(e, attempt)
            wait = self.retry.delay(last, attempt, deadline)
            if wait is None:
                raise last
            time.sleep(wait)
            attempt += 1

    def score(
        self,
        items: Sequence[c.ItemLike] | c.ItemLike,
        model: str | None = None,
        *,
        timeout: float | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> ScoreResponse:
        """Rewards of items (ScoreItem, its dict form, or raw text), in order; `model` a
        reward model's name or alias (default: the server's default model); `weights` a
        composite reward's part weights for this request."""
        request = c.score_request(items, model, weights)
        resp = self._call(self._scoring.Score, request, timeout)
        return c.score_response(resp)

    def rerank(
        self,
        candidates: Sequence[str],
        *,
        prompt: str | None = None,
        messages: c.MessagesLike | None = None,
        model: str | None = None,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> RerankResponse:
        """Candidates for one prompt (text, or chat messages), best first."""
        fields = {"reward_model": model, "top_k": top_k}
        request = c.rerank_request(candidates, prompt, messages, fields)
        return c.rerank_response(self._call(self._bon.Rerank, request, timeout))

    def best_of_n(
        self,
        prompts: Sequence[c.PromptLike] | c.PromptLike,
        *,
        timeout: float | None = None,
        **fields: Any,
    ) -> BestOfNResponse:
        """Best-of-N for each prompt; `fields` are BestOfNRequest's (policy, reward_model, n,
        top_k, return_all, temperature, top_p, max_tokens, seed, stop, selection, ...)."""
        request = c.bon_request(prompts, fields)
        return c.bon_response(self._call(self._bon.BestOfN, request, timeout))

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        resp = self._call(self._scoring.ListModels, pb.ListModelsRequest(), timeout)
        return c.models_response(resp)

    def close(self) -> None:
        self.channel.close()


class AsyncRewardClient(_Base):
    """The asyncio twin of RewardClient: the same methods, awaited. Create it inside the
    event loop that uses it (a grpc.aio channel belongs to one loop).

        async with AsyncRewardClient("127.0.0.1:50051") as client:
            resp = await client.score(["some text"])
    """

    _channels = grpc.aio

    async def _call(self, rpc: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        deadline, attempt = self._deadline(timeout), 1
        last: RewardServeError | None = None
        while True:
            left = c.remaining(deadline, attempt, last)
            try:
                return await rpc(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as e:
                last = from_rpc_error(e, attempt)
            wait = self.retry.delay(last, attempt, deadline)
            if wait is None:
                raise last
            await asyncio.sleep(wait)
            attempt += 1

    async def score(
        self,
        items: Sequence[c.ItemLike] | c.ItemLike,
        model: str | None = None,
        *,
        timeout: float | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> ScoreResponse:
        request = c.score_request(items, model, weights)
        resp = await self._call(self._scoring.Score, request, timeout)
        return c.score_response(resp)

    async def rerank(
        self,
        candidates: Sequence[str],
        *,
        prompt: str | None = None,
        messages: c.MessagesLike | None = None,
        model: str | None = None,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> RerankResponse:
        fields = {"reward_model": model, "top_k": top_k}
        request = c.rerank_request(candidates, prompt, messages, fields)
        return c.rerank_response(await self._call(self._bon.Rerank, request, timeout))

    async def best_of_n(
        self,
        prompts: Sequence[c.PromptLike] | c.PromptLike,
        *,
        timeout: float | None = None,
        **fields: Any,
    ) -> BestOfNResponse:
        request = c.bon_request(prompts, fields)
        return c.bon_response(await self._call(self._bon.BestOfN, request, timeout))

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        resp = await self._call(self._scoring.ListModels, pb.ListModelsRequest(), timeout)
        return c.models_response(resp)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
