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
]

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


def test_grpc_malformed_rerank(bon_stub) -> None:
    err = grpc_error(lambda: bon_stub.Rerank(bpb.RerankRequest(prompt="p"), timeout=10))
    assert err.code() == G.INVALID_ARGUMENT
    assert dict(err.trailing_metadata()).get("error-field") == "candidates"
    req = bpb.RerankRequest(prompt="p", candidates=["a"], reward_model="nope")
    err = grpc_error(lambda: bon_stub.Rerank(req, timeout=10))
    assert err.code() == G.NOT_FOUND


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
    assert got == {k: rest[k] for k in ("reward_model", "results")}
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
