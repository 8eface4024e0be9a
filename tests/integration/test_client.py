"""rewardserve.client against a real server: the same results as REST, typed errors naming the
field, API keys, deadlines and retries (against the server at its queue limit, and against a
minimal real gRPC server that refuses on cue)."""

from __future__ import annotations

import asyncio
import copy
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from builders import build_tiny_policy
from rewardserve.client import (
    AsyncRewardClient,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RetryPolicy,
    RewardClient,
    Unauthenticated,
    Unavailable,
)
from rewardserve.schemas.scoring import ChatMessage, ScoreItem
from rewardserve.v1 import scoring_pb2 as pb
from rewardserve.v1 import scoring_pb2_grpc
from servers import RewardServer, free_port

SCORE_KEY, ADMIN_KEY = "s1", "a1"
HEADERS = {"Authorization": f"Bearer {SCORE_KEY}"}
MAX_QUEUE = 8
PROMPT = "\n\nHuman: hi\n\nAssistant:"
ITEMS_JSON = [
    {"prompt": PROMPT, "response": "Hello! How can I help?"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]},
    {"text": "\n\nHuman: a joke?\n\nAssistant: Why did the chicken cross the road?"},
]


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RewardServer]:
    repo = tmp_path_factory.mktemp("client") / "models"
    shutil.copytree(model_repo, repo)
    build_tiny_policy(repo)
    args = [
        *("--max-queue-items", str(MAX_QUEUE)),
        # a forming batch waits 50 ms for stragglers: a burst really does queue up
        *("--max-wait-ms", "50"),
    ]
    keys = [f"{SCORE_KEY}:score", f"{ADMIN_KEY}:admin"]
    with RewardServer(repo, extra_args=args, api_keys=keys) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: RewardServer) -> Iterator[httpx.Client]:
    with server.http() as client:
        client.headers.update(HEADERS)
        yield client


@pytest.fixture(scope="module")
def client(server: RewardServer) -> Iterator[RewardClient]:
    with RewardClient(server.grpc_target, api_key=SCORE_KEY, timeout=60) as c:
        yield c


def rest(http: httpx.Client, path: str, body: dict) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ---- results equal REST's --------------------------------------------------------------------


@pytest.mark.parametrize("model", [None, "rm-b"])
def test_score_equals_rest_to_the_float(client, http, model) -> None:
    # every input form: dicts, a ScoreItem, a ChatMessage inside, raw text
    items = [
        ITEMS_JSON[0],
        ScoreItem(
            messages=[
                ChatMessage(role="user", content="hi"),
                {"role": "assistant", "content": "hey"},
            ]
        ),
        ITEMS_JSON[2]["text"],
    ]
    got = client.score(items, model=model)
    want = rest(http, "/v1/score", {"model": model, "items": ITEMS_JSON})
    assert got.model_dump() == want
    assert got.model == (model or "rm-a")


async def test_async_score_equals_rest(server, http) -> None:
    want = rest(http, "/v1/score", {"items": ITEMS_JSON})
    async with AsyncRewardClient(server.grpc_target, api_key=SCORE_KEY) as client:
        got = await client.score(ITEMS_JSON)
        many = await asyncio.gather(*(client.score(ITEMS_JSON) for _ in range(3)))
    assert got.model_dump() == want
    # concurrent requests share batches, so their padding differs: equal up to float noise
    for m in many:
        assert [r.reward for r in m.results] == pytest.approx([r.reward for r in got.results])


async def test_async_client_has_the_same_methods_and_errors(server, client) -> None:
    candidates = ["Sure, here it is.", "No."]
    async with AsyncRewardClient(f"grpc://{server.grpc_target}", api_key=SCORE_KEY) as ac:
        assert await ac.rerank(candidates, prompt=PROMPT) == client.rerank(
            candidates, prompt=PROMPT
        )
        assert await ac.list_models() == client.list_models()
        bon = await ac.best_of_n(PROMPT, n=2, max_tokens=3, seed=5, return_all=True)
        same = client.best_of_n(PROMPT, n=2, max_tokens=3, seed=5, return_all=True)
        assert same_results(bon.model_dump(), same.model_dump())
        with pytest.raises(NotFound) as info:
            await ac.score(["x"], model="no-such-model")
        assert info.value.field == "model"
        with pytest.raises(InvalidArgument) as info:
            await ac.score([{"prompt": "p"}])
        assert info.value.field == "items.0"
        with pytest.raises(DeadlineExceeded):
            await ac.best_of_n(PROMPT, n=4, max_tokens=4000, timeout=1.5)
    with pytest.raises(ValueError, match="grpcs://"):
        RewardClient("http://localhost:50051")


def test_rerank_equals_rest(client, http) -> None:
    candidates = ["Sure, here it is.", "No.", "I would rather not say."]
    got = client.rerank(candidates, prompt=PROMPT, model="rm-b", top_k=2)
    want = rest(
        http,
        "/v1/rerank",
        {"prompt": PROMPT, "candidates": candidates, "reward_model": "rm-b", "top_k": 2},
    )
    assert got.model_dump() == want
    messages = [{"role": "user", "content": "hi"}]
    got = client.rerank(candidates, messages=messages)
    want = rest(http, "/v1/rerank", {"messages": messages, "candidates": candidates})
    assert got.model_dump() == want


def same_results(a: dict, b: dict) -> bool:
    """Two Best-of-N responses agree: everything but timings equal, rewards up to float noise
    (candidates are scored as they finish, beside whichever neighbours share their batch)."""

    def split(x: dict) -> tuple[dict, list[float]]:
        kept = copy.deepcopy({k: v for k, v in x.items() if k != "timings"})
        rewards = []
        for r in kept["results"]:
            for cand in [r["chosen"], *r["candidates"]]:
                rewards += [cand.pop("reward"), cand.pop("normalized_reward")]
        return kept, rewards

    (kept_a, rewards_a), (kept_b, rewards_b) = split(a), split(b)
    return kept_a == kept_b and rewards_a == pytest.approx(rewards_b, rel=1e-5)


def test_best_of_n_equals_rest(client, http) -> None:
    fields = {"n": 4, "max_tokens": 6, "seed": 7, "return_all": True}
    # (the tiny policy has no chat template, so its prompts are text)
    prompts = [PROMPT, {"prompt": "\n\nHuman: bye\n\nAssistant:"}]
    got = client.best_of_n(prompts, **fields).model_dump()
    want = rest(http, "/v1/best-of-n", {"prompts": [{"prompt": PROMPT}, prompts[1]], **fields})
    assert same_results(got, want)
    assert got["policy"] == "tiny-policy" and len(got["results"][0]["candidates"]) == 4
    # single-prompt form and an explicit reward model
    one = client.best_of_n(PROMPT, reward_model="rm-b", n=2, max_tokens=2, seed=1)
    assert one.reward_model == "rm-b" and len(one.results) == 1


def test_service_reward_scores_what_best_of_n_scored(server, client) -> None:
    """The trainer's ServiceReward gives each candidate the reward Best-of-N gave it."""
    from rewardserve.schemas.bon import PromptInput
    from rewardserve.training.ppo.remote_rewards import ServiceReward

    result = client.best_of_n(PROMPT, n=6, max_tokens=8, seed=3, return_all=True).results[0]
    texts = [cand.text for cand in result.candidates]
    with ServiceReward(server.grpc_target, api_key=SCORE_KEY) as source:
        got = source.score([PromptInput(prompt=PROMPT)] * len(texts), texts)
        assert source.model == "rm-a"
    # float noise only: Best-of-N scores candidates in batches of its own making
    assert got == pytest.approx([cand.reward for cand in result.candidates], rel=1e-5)


def test_list_models_equals_rest(client, http) -> None:
    got = [m.model_dump() for m in client.list_models()]
    want = http.get("/v1/models").json()["data"]
    assert sorted(got, key=lambda m: m["id"]) == sorted(want, key=lambda m: m["id"])


# ---- typed errors naming the field -----------------------------------------------------------


def rest_error(http: httpx.Client, path: str, body: dict) -> dict:
    r = http.post(path, json=body)
    assert r.status_code >= 400, r.text
    return r.json()["error"]


@pytest.mark.parametrize(
    "items",
    [
        pytest.param([""], id="empty text (refused by the server)"),
        pytest.param(["ok", {"prompt": "p"}], id="pair without response (refused locally)"),
        pytest.param([{"text": 42}], id="wrong type (refused locally)"),
        pytest.param(
            [
                ScoreItem.model_construct(
                    messages=[ChatMessage.model_construct(role="robot", content="x")]
                )
            ],
            id="unvalidated ScoreItem (refused by the server)",
        ),
    ],
)
def test_invalid_items_raise_invalid_argument_naming_the_rest_field(client, http, items) -> None:
    with pytest.raises(InvalidArgument) as info:
        client.score(items)
    as_json = [
        {"text": it}
        if isinstance(it, str)
        else it.model_dump(exclude_none=True)
        if isinstance(it, ScoreItem)
        else it
        for it in items
    ]
    assert info.value.field == rest_error(http, "/v1/score", {"items": as_json})["field"]
    assert info.value.field.startswith(f"items.{len(items) - 1}")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_invalid_best_of_n_fields(client) -> None:
    with pytest.raises(InvalidArgument) as info:
        client.best_of_n(PROMPT, n=0)
    assert (info.value.field, info.value.error_code) == ("n", "invalid_argument")
    with pytest.raises(InvalidArgument) as info:
        client.best_of_n(PROMPT, nn=2)
    assert info.value.field == "nn"
    with pytest.raises(InvalidArgument) as info:
        client.rerank(["a"], prompt="p", messages=[{"role": "user", "content": "x"}])
    assert info.value.field == "prompt"


def test_unknown_model_is_not_found(client, http) -> None:
    with pytest.raises(NotFound) as info:
        client.score(["x"], model="no-such-model")
    err = rest_error(http, "/v1/score", {"model": "no-such-model", "items": [{"text": "x"}]})
    assert (
        (info.value.field, info.value.error_code)
        == (err["field"], err["code"])
        == (
            "model",
            "not_found",
        )
    )
    assert "no-such-model" in info.value.message
    with pytest.raises(NotFound) as info:
        client.best_of_n(PROMPT, policy="no-such-policy")
    assert info.value.field == "policy"


@pytest.mark.parametrize(
    ("key", "error"),
    [(None, Unauthenticated), ("wrong", Unauthenticated), (ADMIN_KEY, PermissionDenied)],
)
def test_api_keys(server, key, error) -> None:
    with RewardClient(server.grpc_target, api_key=key) as c:
        with pytest.raises(error) as info:
            c.score(["x"])
        assert info.value.field == "authorization"
        with pytest.raises(error):
            c.list_models()
        assert info.value.attempts == 1  # never retried


# ---- deadlines -------------------------------------------------------------------------------


def test_deadline_exceeded_is_raised_promptly(client) -> None:
    # minutes of decoding for a tiny policy with no EOS; the deadline cuts it to seconds
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.best_of_n(PROMPT, n=4, max_tokens=4000, timeout=1.5)
    assert time.monotonic() - started < 60
    with pytest.raises(DeadlineExceeded):
        client.score(["x"] * 4, timeout=1e-4)
    assert client.score(["x"]).results  # the client is fine afterwards


# ---- retries: the real server at its queue limit ---------------------------------------------


def rejected(http: httpx.Client) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        if family.name == "rewardserve_rejected_requests":
            return sum(s.value for s in family.samples if s.labels.get("model") == "rm-a")
    return 0.0


BURST = 30
BURST_ITEMS = [f"burst item {i} " * 10 for i in range(4)]


async def burst(server: RewardServer, retry: RetryPolicy) -> list[object]:
    async with AsyncRewardClient(server.grpc_target, api_key=SCORE_KEY, retry=retry) as c:
        return await asyncio.gather(
            *(c.score(BURST_ITEMS, timeout=120) for _ in range(BURST)), return_exceptions=True
        )


async def test_without_retries_a_burst_gets_resource_exhausted_with_retry_after(
    server, http
) -> None:
    outcomes = await burst(server, RetryPolicy(max_attempts=1))
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors and len(errors) < BURST, outcomes
    for e in errors:
        assert isinstance(e, ResourceExhausted), e
        assert e.error_code == "overloaded" and e.retry_after >= 1 and e.attempts == 1


async def test_with_retries_the_same_burst_all_succeeds(server, http) -> None:
    before = rejected(http)
    outcomes = await burst(server, RetryPolicy(max_attempts=30, max_backoff_s=1.0))
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    want = rest(http, "/v1/score", {"items": [{"text": t} for t in BURST_ITEMS]})["results"]
    assert all([r.reward for r in o.results] == [w["reward"] for w in want] for o in outcomes)
    assert rejected(http) > before  # the server did refuse some attempts: they were retried


# ---- retries: a minimal real gRPC server that refuses on cue ---------------------------------


class Refusing(scoring_pb2_grpc.RewardServiceServicer):
    """Answers Score with the scripted refusals first, then a one-result response."""

    def __init__(self) -> None:
        self.script: list[tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]] = []
        self.calls: list[float] = []
        self.lock = threading.Lock()

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        with self.lock:
            self.calls.append(time.monotonic())
            step = self.script.pop(0) if self.script else None
        if step is not None:
            code, trailers = step
            context.set_trailing_metadata(trailers)
            context.abort(code, f"scripted {code.name}")
        return pb.ScoreResponse(model="scripted", results=[pb.ScoreResult(index=0, reward=1.5)])


@pytest.fixture
def refusing() -> Iterator[tuple[Refusing, str]]:
    servicer = Refusing()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    scoring_pb2_grpc.add_RewardServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield servicer, f"127.0.0.1:{port}"
    srv.stop(None)


OVERLOADED = (("error-code", "overloaded"), ("retry-after", "0.3"))
FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, jitter=0.0)


def test_retry_after_is_honoured_then_the_call_succeeds(refusing) -> None:
    servicer, target = refusing
    ex = grpc.StatusCode.RESOURCE_EXHAUSTED
    servicer.script = [(ex, OVERLOADED), (ex, OVERLOADED)]
    with RewardClient(target, retry=FAST) as c:
        assert c.score(["x"]).results[0].reward == 1.5
    gaps = [b - a for a, b in zip(servicer.calls, servicer.calls[1:], strict=False)]
    assert len(servicer.calls) == 3 and min(gaps) >= 0.3, gaps


def test_after_max_attempts_resource_exhausted_carries_retry_after(refusing) -> None:
    servicer, target = refusing
    servicer.script = [(grpc.StatusCode.RESOURCE_EXHAUSTED, OVERLOADED)] * 5
    with RewardClient(target, retry=FAST) as c, pytest.raises(ResourceExhausted) as info:
        c.score(["x"])
    assert (info.value.retry_after, info.value.attempts, len(servicer.calls)) == (0.3, 3, 3)
    assert info.value.error_code == "overloaded"


def test_a_wait_past_the_deadline_is_not_started(refusing) -> None:
    servicer, target = refusing
    long_wait = (("error-code", "overloaded"), ("retry-after", "30"))
    servicer.script = [(grpc.StatusCode.RESOURCE_EXHAUSTED, long_wait)]
    started = time.monotonic()
    with RewardClient(target, retry=FAST) as c, pytest.raises(ResourceExhausted) as info:
        c.score(["x"], timeout=5)
    assert time.monotonic() - started < 5 and len(servicer.calls) == 1
    assert info.value.retry_after == 30


@pytest.mark.parametrize(
    ("code", "trailers", "calls"),
    [
        (grpc.StatusCode.UNAVAILABLE, (), 2),  # retried without any hint
        (grpc.StatusCode.RESOURCE_EXHAUSTED, (("error-code", "payload_too_large"),), 1),
        (grpc.StatusCode.INVALID_ARGUMENT, (("error-field", "items.0.text"),), 1),
    ],
)
async def test_which_codes_are_retried_sync_and_async(refusing, code, trailers, calls) -> None:
    servicer, target = refusing
    servicer.script = [(code, trailers)]
    with RewardClient(target, retry=FAST) as c:
        outcome = None
        try:
            c.score(["x"])
        except Exception as e:
            outcome = e
    assert len(servicer.calls) == calls
    assert (outcome is None) == (calls == 2)
    if outcome is not None:
        assert outcome.code == code and outcome.field == dict(trailers).get("error-field")
    servicer.calls.clear()
    servicer.script = [(code, trailers)]
    async with AsyncRewardClient(target, retry=FAST) as ac:
        try:
            await ac.score(["x"])
            aoutcome = None
        except Exception as e:
            aoutcome = e
    assert len(servicer.calls) == calls
    assert type(aoutcome) is type(outcome)


def test_nothing_listening_is_unavailable_after_max_attempts() -> None:
    target = f"127.0.0.1:{free_port()}"
    with RewardClient(target, retry=FAST) as c, pytest.raises(Unavailable) as info:
        c.score(["x"], timeout=10)
    assert info.value.attempts == 3
