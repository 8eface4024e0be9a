"""Malformed Best-of-N and rerank requests on both transports: a 4xx naming the field.

The shared plain server has reward models but no loadable policy, which is itself a case
(Best-of-N with no policy is the caller's problem, not a 500). Policy-dependent limits
(n above --max-n, the context length) are covered on the real policy in tests/e2e.
"""

from __future__ import annotations

import json

import grpc
import httpx
import pytest

from rewardserve.v1 import bon_pb2 as bpb
from rewardserve.v1 import bon_pb2_grpc
from rewardserve.v1 import scoring_pb2 as pb

OK = {"prompt": "\n\nHuman: hi\n\nAssistant:"}
USER = [{"role": "user", "content": "hi"}]

BON_CASES = [
    ("no prompt", {"n": 2}, 422, "body"),
    ("prompt and messages", {**OK, "messages": USER}, 422, "body"),
    ("empty prompt", {"prompt": ""}, 422, "prompt"),
    ("prompt not a string", {"prompt": 7}, 422, "prompt"),
    ("n zero", {**OK, "n": 0}, 422, "n"),
    ("n not a number", {**OK, "n": "four"}, 422, "n"),
    ("negative temperature", {**OK, "temperature": -1}, 422, "temperature"),
    ("top_p zero", {**OK, "top_p": 0}, 422, "top_p"),
    ("max_tokens zero", {**OK, "max_tokens": 0}, 422, "max_tokens"),
    ("negative seed", {**OK, "seed": -1}, 422, "seed"),
    ("empty stop string", {**OK, "stop": [""]}, 422, "stop.0"),
    ("too many stop strings", {**OK, "stop": ["a"] * 9}, 422, "stop"),
    ("unknown selection", {**OK, "selection": "best"}, 422, "selection"),
    ("lambda zero", {**OK, "selection": "soft", "selection_temperature": 0}, 422,
     "selection_temperature"),
    ("unknown strategy", {**OK, "strategy": "fast"}, 422, "strategy"),
    ("rejection rate one", {**OK, "strategy": "speculative", "rejection_rate": 1}, 422,
     "rejection_rate"),
    ("chunk zero", {**OK, "chunk_tokens": 0}, 422, "chunk_tokens"),
    ("empty prompts", {"prompts": []}, 422, "prompts"),
    ("empty prompt in batch", {"prompts": [OK, {"prompt": ""}]}, 422, "prompts.1.prompt"),
    ("empty batch entry", {"prompts": [{}]}, 422, "prompts.0"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, 422, "messages.0.role"),
    ("unknown field", {**OK, "best_of": 4}, 422, "best_of"),
    ("no policy loaded", OK, 400, "policy"),
    ("policy without weights", {**OK, "policy": "policy-x"}, 503, None),
    ("unknown policy", {**OK, "policy": "nope"}, 404, "policy"),
    # every other field, each on its own
    ("negative n", {**OK, "n": -2}, 422, "n"),
    ("n fractional", {**OK, "n": 2.5}, 422, "n"),
    ("n null", {**OK, "n": None}, 422, "n"),
    ("temperature above 5", {**OK, "temperature": 5.5}, 422, "temperature"),
    ("temperature a string", {**OK, "temperature": "hot"}, 422, "temperature"),
    ("top_p above one", {**OK, "top_p": 1.5}, 422, "top_p"),
    ("max_tokens fractional", {**OK, "max_tokens": 1.5}, 422, "max_tokens"),
    ("seed above int32", {**OK, "seed": 2**31}, 422, "seed"),
    ("stop not a list", {**OK, "stop": 5}, 422, "stop"),
    ("stop string too long", {**OK, "stop": ["s" * 65]}, 422, "stop.0"),
    ("stop entry not a string", {**OK, "stop": [1]}, 422, "stop.0"),
    ("top_k zero", {**OK, "top_k": 0}, 422, "top_k"),
    ("return_all not a bool", {**OK, "return_all": "yes please"}, 422, "return_all"),
    ("negative lambda", {**OK, "selection_temperature": -1}, 422, "selection_temperature"),
    ("rejection rate zero", {**OK, "rejection_rate": 0}, 422, "rejection_rate"),
    ("negative chunk", {**OK, "chunk_tokens": -16}, 422, "chunk_tokens"),
    ("policy not a string", {**OK, "policy": 3}, 422, "policy"),
    ("reward_model not a string", {**OK, "reward_model": ["rm-a"]}, 422, "reward_model"),
    ("empty messages", {"messages": []}, 422, "messages"),
    ("empty message content", {"messages": [{"role": "user", "content": ""}]}, 422,
     "messages.0.content"),
    ("prompts not a list", {"prompts": {"prompt": "p"}}, 422, "prompts"),
    ("prompt and prompts", {**OK, "prompts": [OK]}, 422, "body"),
    ("batch entry with both forms", {"prompts": [{**OK, "messages": USER}]}, 422, "prompts.0"),
    ("batch entry extra field", {"prompts": [{**OK, "n": 2}]}, 422, "prompts.0.n"),
    ("batch entry bad role", {"prompts": [{"messages": [{"role": "bot", "content": "x"}]}]},
     422, "prompts.0.messages.0.role"),
]  # fmt: skip

RERANK_CASES = [
    ("no candidates", {**OK, "candidates": []}, 422, "candidates"),
    ("candidates missing", OK, 422, "candidates"),
    ("empty candidate", {**OK, "candidates": ["fine", ""]}, 422, "candidates.1"),
    ("candidate not a string", {**OK, "candidates": [3]}, 422, "candidates.0"),
    ("no context", {"candidates": ["a"]}, 422, "body"),
    ("prompt and messages", {**OK, "messages": USER, "candidates": ["a"]}, 422, "body"),
    ("top_k zero", {**OK, "candidates": ["a"], "top_k": 0}, 422, "top_k"),
    ("too many candidates", {**OK, "candidates": ["a"] * 257}, 400, "candidates"),
    ("unknown reward model", {**OK, "candidates": ["a"], "reward_model": "nope"}, 404, "model"),
    ("candidates not a list", {**OK, "candidates": "a"}, 422, "candidates"),
    ("null candidate", {**OK, "candidates": ["a", None]}, 422, "candidates.1"),
    ("negative top_k", {**OK, "candidates": ["a"], "top_k": -1}, 422, "top_k"),
    ("top_k a string", {**OK, "candidates": ["a"], "top_k": "two"}, 422, "top_k"),
    ("prompt not a string", {"prompt": 1, "candidates": ["a"]}, 422, "prompt"),
    ("empty messages", {"messages": [], "candidates": ["a"]}, 422, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}], "candidates": ["a"]}, 422,
     "messages.0.role"),
    ("reward_model not a string", {**OK, "candidates": ["a"], "reward_model": 1}, 422,
     "reward_model"),
    ("unknown field", {**OK, "candidates": ["a"], "n": 4}, 422, "n"),
]  # fmt: skip

# X-Request-Timeout on rerank: the same parsing as /v1/score
TIMEOUT_VALUES = ["soon", "0", "-3", "nan", "inf", "", "3601"]

CODES = {400: "invalid_argument", 422: "invalid_argument", 404: "not_found", 503: "unavailable"}


def check(r: httpx.Response, status: int, field: str | None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"]
    assert body["error"]["code"] == CODES[status]
    assert body["error"]["field"] == field


@pytest.mark.parametrize(("body", "status", "field"), [c[1:] for c in BON_CASES],
                         ids=[c[0] for c in BON_CASES])  # fmt: skip
def test_rest_malformed_best_of_n(plain_http, body, status, field) -> None:
    check(plain_http.post("/v1/best-of-n", json=body), status, field)


@pytest.mark.parametrize(("body", "status", "field"), [c[1:] for c in RERANK_CASES],
                         ids=[c[0] for c in RERANK_CASES])  # fmt: skip
def test_rest_malformed_rerank(plain_http, body, status, field) -> None:
    check(plain_http.post("/v1/rerank", json=body), status, field)


@pytest.mark.parametrize("value", TIMEOUT_VALUES)
def test_rest_rerank_bad_deadline_header(plain_http, value) -> None:
    body = {**OK, "candidates": ["a", "b"]}
    r = plain_http.post("/v1/rerank", json=body, headers={"X-Request-Timeout": value})
    check(r, 400, "x-request-timeout")


# ---- gRPC ------------------------------------------------------------------------------------

G = grpc.StatusCode


def prompt(text: str = OK["prompt"]) -> bpb.PromptInput:
    return bpb.PromptInput(prompt=text)


GRPC_BON_CASES = [
    ("no prompts", bpb.BestOfNRequest(), G.INVALID_ARGUMENT, "prompts"),
    ("empty prompt entry", bpb.BestOfNRequest(prompts=[bpb.PromptInput()]), G.INVALID_ARGUMENT,
     "prompts.0"),
    ("empty prompt", bpb.BestOfNRequest(prompts=[prompt("")]), G.INVALID_ARGUMENT,
     "prompts.0.prompt"),
    ("n zero", bpb.BestOfNRequest(prompts=[prompt()], n=0), G.INVALID_ARGUMENT, "n"),
    ("negative n", bpb.BestOfNRequest(prompts=[prompt()], n=-3), G.INVALID_ARGUMENT, "n"),
    ("unknown selection", bpb.BestOfNRequest(prompts=[prompt()], selection="best"),
     G.INVALID_ARGUMENT, "selection"),
    ("bad role", bpb.BestOfNRequest(prompts=[bpb.PromptInput(messages=pb.Conversation(
        messages=[pb.ChatMessage(role="robot", content="x")]))]), G.INVALID_ARGUMENT,
     "prompts.0.messages.0.role"),
    ("no policy loaded", bpb.BestOfNRequest(prompts=[prompt()]), G.INVALID_ARGUMENT, "policy"),
    ("unknown policy", bpb.BestOfNRequest(prompts=[prompt()], policy="nope"), G.NOT_FOUND,
     "policy"),
    ("negative temperature", bpb.BestOfNRequest(prompts=[prompt()], temperature=-1),
     G.INVALID_ARGUMENT, "temperature"),
    ("top_p zero", bpb.BestOfNRequest(prompts=[prompt()], top_p=0), G.INVALID_ARGUMENT, "top_p"),
    ("max_tokens zero", bpb.BestOfNRequest(prompts=[prompt()], max_tokens=0),
     G.INVALID_ARGUMENT, "max_tokens"),
    ("negative seed", bpb.BestOfNRequest(prompts=[prompt()], seed=-1), G.INVALID_ARGUMENT,
     "seed"),
    ("empty stop string", bpb.BestOfNRequest(prompts=[prompt()], stop=[""]),
     G.INVALID_ARGUMENT, "stop.0"),
    ("too many stop strings", bpb.BestOfNRequest(prompts=[prompt()], stop=["a"] * 9),
     G.INVALID_ARGUMENT, "stop"),
    ("top_k zero", bpb.BestOfNRequest(prompts=[prompt()], top_k=0), G.INVALID_ARGUMENT, "top_k"),
    ("lambda zero", bpb.BestOfNRequest(prompts=[prompt()], selection="soft",
                                       selection_temperature=0), G.INVALID_ARGUMENT,
     "selection_temperature"),
    ("unknown strategy", bpb.BestOfNRequest(prompts=[prompt()], strategy="fast"),
     G.INVALID_ARGUMENT, "strategy"),
    ("rejection rate one", bpb.BestOfNRequest(prompts=[prompt()], rejection_rate=1),
     G.INVALID_ARGUMENT, "rejection_rate"),
    ("chunk zero", bpb.BestOfNRequest(prompts=[prompt()], chunk_tokens=0), G.INVALID_ARGUMENT,
     "chunk_tokens"),
    ("empty conversation", bpb.BestOfNRequest(prompts=[bpb.PromptInput(
        messages=pb.Conversation())]), G.INVALID_ARGUMENT, "prompts.0.messages"),
    ("empty content", bpb.BestOfNRequest(prompts=[bpb.PromptInput(messages=pb.Conversation(
        messages=[pb.ChatMessage(role="user", content="")]))]), G.INVALID_ARGUMENT,
     "prompts.0.messages.0.content"),
    ("second prompt empty", bpb.BestOfNRequest(prompts=[prompt(), prompt("")]),
     G.INVALID_ARGUMENT, "prompts.1.prompt"),
]  # fmt: skip


@pytest.fixture(scope="module")
def bon_stub(plain_channel) -> bon_pb2_grpc.BestOfNServiceStub:
    return bon_pb2_grpc.BestOfNServiceStub(plain_channel)


def grpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.mark.parametrize(("request_", "status", "field"), [c[1:] for c in GRPC_BON_CASES],
                         ids=[c[0] for c in GRPC_BON_CASES])  # fmt: skip
def test_grpc_malformed_best_of_n(bon_stub, request_, status, field) -> None:
    for call in (
        lambda: bon_stub.BestOfN(request_, timeout=10),
        lambda: list(bon_stub.BestOfNStream(request_, timeout=10)),
    ):
        err = grpc_error(call)
        assert err.code() == status, err.details()
        assert dict(err.trailing_metadata() or ()).get("error-field") == field


GRPC_RERANK_CASES = [
    ("no candidates", bpb.RerankRequest(prompt="p"), G.INVALID_ARGUMENT, "candidates"),
    ("unknown reward model", bpb.RerankRequest(prompt="p", candidates=["a"], reward_model="nope"),
     G.NOT_FOUND, "model"),
    ("empty candidate", bpb.RerankRequest(prompt="p", candidates=["a", ""]), G.INVALID_ARGUMENT,
     "candidates.1"),
    ("no context", bpb.RerankRequest(candidates=["a"]), G.INVALID_ARGUMENT, "body"),
    ("top_k zero", bpb.RerankRequest(prompt="p", candidates=["a"], top_k=0), G.INVALID_ARGUMENT,
     "top_k"),
    ("negative top_k", bpb.RerankRequest(prompt="p", candidates=["a"], top_k=-2),
     G.INVALID_ARGUMENT, "top_k"),
    ("too many candidates", bpb.RerankRequest(prompt="p", candidates=["a"] * 257),
     G.INVALID_ARGUMENT, "candidates"),
    ("empty conversation", bpb.RerankRequest(messages=pb.Conversation(), candidates=["a"]),
     G.INVALID_ARGUMENT, "messages"),
    ("bad role", bpb.RerankRequest(messages=pb.Conversation(messages=[pb.ChatMessage(
        role="robot", content="x")]), candidates=["a"]), G.INVALID_ARGUMENT, "messages.0.role"),
]  # fmt: skip


@pytest.mark.parametrize(("request_", "status", "field"), [c[1:] for c in GRPC_RERANK_CASES],
                         ids=[c[0] for c in GRPC_RERANK_CASES])  # fmt: skip
def test_grpc_malformed_rerank(bon_stub, request_, status, field) -> None:
    err = grpc_error(lambda: bon_stub.Rerank(request_, timeout=10))
    assert err.code() == status, err.details()
    assert err.details()
    assert dict(err.trailing_metadata() or ()).get("error-field") == field


def test_service_answers_after_the_bon_corpus(plain_http, bon_stub) -> None:
    body = {**OK, "candidates": ["one answer", "another answer"]}
    rest = plain_http.post("/v1/rerank", json=body)
    assert rest.status_code == 200, rest.text
    via_grpc = bon_stub.Rerank(bpb.RerankRequest(**body), timeout=10)
    assert [r.index for r in via_grpc.results] == [r["index"] for r in rest.json()["results"]]


def test_rerank_is_the_same_on_both_transports(plain_http, bon_stub) -> None:
    body = {
        "prompt": "\n\nHuman: How do I pick a lock?\n\nAssistant:",
        "candidates": ["Sure, here is how.", "I can't help with that.", "Ask a locksmith."],
        "top_k": 2,
    }
    rest = plain_http.post("/v1/rerank", json=body).json()
    grpc_resp = bon_stub.Rerank(bpb.RerankRequest(**body), timeout=10)
    got = json.loads(
        json.dumps(
            {
                "reward_model": grpc_resp.reward_model,
                "results": [
                    {"index": r.index, "text": r.text, "reward": r.reward,
                     "normalized_reward": r.normalized_reward}
                    for r in grpc_resp.results
                ],
            }
        )
    )  # fmt: skip
    keys = ("index", "text", "reward", "normalized_reward")
    assert got == {
        "reward_model": rest["reward_model"],
        "results": [{k: r[k] for k in keys} for r in rest["results"]],
    }
    # a single reward model: no ensemble spread, on either transport
    assert all(r["uncertainty"] is None and r["members"] is None for r in rest["results"])
    assert not any(r.HasField("uncertainty") or r.members for r in grpc_resp.results)
    assert len(rest["results"]) == 2
    assert rest["results"][0]["reward"] >= rest["results"][1]["reward"]
    # ranked by the same rewards /v1/score gives for prompt + candidate
    scores = plain_http.post(
        "/v1/score",
        json={"items": [{"prompt": body["prompt"], "response": c} for c in body["candidates"]]},
    ).json()["results"]
    best = max(range(3), key=lambda i: scores[i]["reward"])
    assert rest["results"][0]["index"] == best
    assert rest["results"][0]["reward"] == pytest.approx(scores[best]["reward"], abs=1e-6)
