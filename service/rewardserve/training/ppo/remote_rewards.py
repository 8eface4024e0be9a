"""Reward sources outside the trainer's process (the RewardSource protocol of rewards.py).

ServiceReward: a running rewardserve's gRPC Score, so rollouts share the batcher with live
traffic and are scored exactly as /v1/best-of-n scores a candidate (the prompt with the
response as the assistant's reply: rewardserve.bon.service.reward_item).
OpenRLHFReward: any server in OpenRLHF's remote reward-model shape (POST /get_reward).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from rewardserve.client import RetryPolicy, RewardClient
from rewardserve.client import errors as e
from rewardserve.client._common import Closing
from rewardserve.engine.inputs import join_pair, render_hh
from rewardserve.schemas.bon import PromptInput
from rewardserve.schemas.scoring import ChatMessage, ScoreItem
from rewardserve.training.ppo.rewards import RewardBatch, batch_of_results

# The server's default --max-items-per-request is 512; stay well under it.
DEFAULT_ITEMS_PER_REQUEST = 256
EMPTY_REPLY = " "


def _pairs(prompts: Sequence[PromptInput], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")


def service_item(prompt: PromptInput, response: str) -> ScoreItem | str:
    """What Score gets for one rollout: reward_item's conversation or pair.

    Score refuses an empty reply (the Best-of-N path, which builds its items unvalidated,
    does not). A pair with an empty reply goes as the text join_pair would make of it, which
    is exactly what the server renders; an empty assistant message is sent as one space,
    which a WordPiece or BPE tokenizer that strips whitespace encodes the same way.
    """
    if prompt.messages is not None:
        reply = ChatMessage(role="assistant", content=response or EMPTY_REPLY)
        return ScoreItem(messages=[*prompt.messages, reply], label=prompt.label)
    assert prompt.prompt is not None
    if not response:
        if prompt.label is not None:  # a label needs an item to travel in
            return ScoreItem(
                text=join_pair(prompt.prompt, response) or EMPTY_REPLY, label=prompt.label
            )
        return join_pair(prompt.prompt, response)
    return ScoreItem(prompt=prompt.prompt, response=response, label=prompt.label)


class ServiceReward(Closing):
    """Raw rewards from a running rewardserve (gRPC `Score`), with an ensemble's members and
    uncertainty (ScoreResult fields 6 and 7) where the service sends them."""

    ensemble: bool | None = None
    """Unknown until the first batch is scored: the model list does not say."""

    def __init__(
        self,
        target: str,
        reward_model: str | None = None,
        timeout_s: float = 120.0,
        api_key: str | None = None,
        *,
        items_per_request: int = DEFAULT_ITEMS_PER_REQUEST,
        retry: RetryPolicy | None = None,
    ) -> None:
        """`target`: the service's gRPC address (host:port, grpc://, grpcs://). `timeout_s`:
        the deadline of each score() call's requests, retries included. Raises NotFound
        (field reward_model) at once when the service has no such reward model."""
        self.client = RewardClient(target, api_key=api_key, timeout=timeout_s, retry=retry)
        self.items_per_request = items_per_request
        try:
            self.model = self._canonical(reward_model)
        except BaseException:
            self.client.close()
            raise

    def _canonical(self, name: str | None) -> str:
        """The name the service gives the model (`name` may be an alias; None: its default)."""
        rewards = [m for m in self.client.list_models() if m.kind == "reward"]
        for m in rewards:
            if (name is None and m.default) or (name is not None and name in (m.id, *m.aliases)):
                return m.id
        wanted = f"reward model '{name}'" if name else "default reward model"
        raise e.NotFound(
            f"the service at {self.client.target} has no {wanted}", field="reward_model"
        )

    def score(self, prompts: Sequence[PromptInput], responses: Sequence[str]) -> list[float]:
        return self.score_batch(prompts, responses).rewards

    def score_batch(self, prompts: Sequence[PromptInput], responses: Sequence[str]) -> RewardBatch:
        _pairs(prompts, responses)
        items = [service_item(p, r) for p, r in zip(prompts, responses, strict=True)]
        results: list[Any] = []
        for start in range(0, len(items), self.items_per_request):
            chunk = items[start : start + self.items_per_request]
            results.extend(self.client.score(chunk, self.model).results)
        return batch_of_results(results)

    def close(self) -> None:
        self.client.close()


# ---- OpenRLHF's remote reward model ----------------------------------------------------------


def hh_text(prompt: PromptInput, response: str) -> str:
    """The prompt and response as one HH text: what rewardserve scores for a reward model
    without a chat template (the default one), pair or conversation alike."""
    if prompt.messages is not None:
        reply = ChatMessage.model_construct(role="assistant", content=response)
        return render_hh([*prompt.messages, reply])
    assert prompt.prompt is not None
    return join_pair(prompt.prompt, response)


def _prompt_text(prompt: PromptInput) -> str:
    return prompt.prompt if prompt.prompt is not None else render_hh(prompt.messages or [])


_HTTP_ERRORS: dict[int, type[e.RewardServeError]] = {
    400: e.InvalidArgument,
    401: e.Unauthenticated,
    403: e.PermissionDenied,
    404: e.NotFound,
    413: e.ResourceExhausted,
    422: e.InvalidArgument,
    429: e.ResourceExhausted,
    503: e.Unavailable,
    504: e.DeadlineExceeded,
}


def _http_error(r: httpx.Response, attempts: int) -> e.RewardServeError:
    """A refusal as the client's exception; rewardserve's error body names code and field."""
    try:
        detail = r.json().get("error") or {}
    except ValueError:
        detail = {}
    if not isinstance(detail, dict):
        detail = {}
    retry_after = e.retry_after_of({k.lower(): v for k, v in r.headers.items()})
    if r.status_code == 429 and retry_after is None:
        retry_after = 0.0  # an HTTP 429 always means "later", hinted or not
    cls = _HTTP_ERRORS.get(r.status_code, e.RewardServeError)
    return cls(
        detail.get("message") or f"HTTP {r.status_code}: {r.text[:200]}",
        field=detail.get("field"),
        error_code=detail.get("code"),
        retry_after=retry_after,
        attempts=attempts,
    )


class OpenRLHFReward(Closing):
    """Raw rewards from a server in OpenRLHF's remote reward-model shape: POST
    {"query": [full texts], "prompts": [...], "labels": [...]} to `url`, read "rewards".
    Retries 429 and 503 (honouring Retry-After) and connection failures, within `timeout_s`.
    That shape has rewards only: never an ensemble's members or uncertainty.

    `render(prompt, response)` makes each full text (default: HH text, what rewardserve
    scores for a model without a chat template); the reward model's name is `model`."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 120.0,
        *,
        api_key: str | None = None,
        model: str = "openrlhf-remote",
        render: Callable[[PromptInput, str], str] = hh_text,
        retry: RetryPolicy | None = None,
        items_per_request: int = DEFAULT_ITEMS_PER_REQUEST,
    ) -> None:
        self.url, self.timeout_s, self.model, self.render = url, timeout_s, model, render
        self.ensemble = False
        self.retry = retry or RetryPolicy()
        self.items_per_request = items_per_request
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # trust_env off: a trainer's HTTP(S)_PROXY must not reroute a reward server's traffic
        self.http = httpx.Client(timeout=timeout_s, headers=headers, trust_env=False)

    def _post(self, body: dict[str, Any]) -> list[float]:
        deadline, attempt = time.monotonic() + self.timeout_s, 1
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise e.DeadlineExceeded(f"no answer from {self.url} in {self.timeout_s} s")
            try:
                r = self.http.post(self.url, json=body, timeout=left)
                if r.status_code == 200:
                    rewards = [float(x) for x in r.json()["rewards"]]
                    if len(rewards) != len(body["query"]):
                        raise e.Internal(
                            f"{self.url} answered {len(rewards)} rewards for "
                            f"{len(body['query'])} queries"
                        )
                    return rewards
                err = _http_error(r, attempt)
            except httpx.TimeoutException as x:
                raise e.DeadlineExceeded(f"{self.url}: {x}", attempts=attempt) from None
            except httpx.TransportError as x:
                err = e.Unavailable(f"{self.url}: {x}", attempts=attempt)
            wait = self.retry.delay(err, attempt, deadline)
            if wait is None:
                raise err
            time.sleep(wait)
            attempt += 1

    def score(
        self,
        prompts: Sequence[PromptInput],
        responses: Sequence[str],
        labels: Sequence[Any] | None = None,
    ) -> list[float]:
        _pairs(prompts, responses)
        rewards: list[float] = []
        step = self.items_per_request
        for start in range(0, len(prompts), step):
            ps, rs = prompts[start : start + step], responses[start : start + step]
            body: dict[str, Any] = {
                "query": [self.render(p, r) for p, r in zip(ps, rs, strict=True)],
                "prompts": [_prompt_text(p) for p in ps],
            }
            if labels is not None:
                body["labels"] = list(labels[start : start + step])
            rewards.extend(self._post(body))
        return rewards

    def close(self) -> None:
        self.http.close()
