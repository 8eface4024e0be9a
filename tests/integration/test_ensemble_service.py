"""An ensemble reward model served over both transports: the same reward, uncertainty and
members to the last float on REST and gRPC, the compat routes' shapes unchanged, and the
ensemble listed once with its size."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import httpx
import pytest
from google.protobuf import json_format

from builders import build_tiny_ensemble, build_tiny_rm
from rewardserve.v1 import bon_pb2, bon_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from servers import RewardServer, pb_request, pb_response_dict, sharpen_weights

TEXTS = [
    "\n\nHuman: is the sky blue?\n\nAssistant: yes",
    "\n\nHuman: tell me a story\n\nAssistant: once upon a time there was a cat",
    "No.",
]
BODY = {"model": "ens", "items": [{"text": t} for t in TEXTS]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RewardServer]:
    root = tmp_path_factory.mktemp("ensemble-served") / "models"
    build_tiny_ensemble(
        root,
        "ens",
        (0, 1, 2),
        sharpen=lambda f, seed: sharpen_weights(f, 50 + seed),
        default=True,  # OpenRLHF's /get_reward names no model: the default scores
    )
    sharpen_weights(build_tiny_rm(root, "single", seed=3), 3)
    with RewardServer(root) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: RewardServer) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


@pytest.fixture(scope="module")
def channel(server: RewardServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


def test_rest_and_grpc_give_the_same_ensemble_scores(
    http: httpx.Client, channel: grpc.Channel
) -> None:
    rest = http.post("/v1/score", json=BODY)
    assert rest.status_code == 200, rest.text
    stub = scoring_pb2_grpc.RewardServiceStub(channel)
    via_grpc = pb_response_dict(stub.Score(pb_request(BODY), timeout=30))
    assert rest.json() == via_grpc  # every float, bit for bit
    for r in rest.json()["results"]:
        members = r["members"]
        assert len(members) == 3 and r["uncertainty"] > 0
        mean = math.fsum(members) / 3
        assert r["reward"] == r["normalized_reward"] == mean
        assert r["uncertainty"] == pytest.approx(
            math.sqrt(math.fsum((m - mean) ** 2 for m in members) / 3), rel=1e-12
        )


def test_a_single_model_has_no_uncertainty_on_either_transport(
    http: httpx.Client, channel: grpc.Channel
) -> None:
    body = BODY | {"model": "single"}
    rest = http.post("/v1/score", json=body).json()
    stub = scoring_pb2_grpc.RewardServiceStub(channel)
    grpc_resp = stub.Score(pb_request(body), timeout=30)
    assert all(r["uncertainty"] is None and r["members"] is None for r in rest["results"])
    assert all(not r.HasField("uncertainty") and not r.members for r in grpc_resp.results)
    assert rest == pb_response_dict(grpc_resp)


def test_compat_routes_keep_their_shapes_with_the_ensembles_reward(http: httpx.Client) -> None:
    rewards = [r["reward"] for r in http.post("/v1/score", json=BODY).json()["results"]]
    got = http.post("/get_reward", json={"query": TEXTS})  # the default: the ensemble
    assert got.status_code == 200
    assert got.json() == {"rewards": rewards, "scores": rewards, "extra_logs": {}}
    classify = http.post(
        "/classify", json={"model": "ens", "input": TEXTS, "use_activation": False}
    )
    body = classify.json()
    assert classify.status_code == 200
    assert [d["probs"] for d in body["data"]] == [[r] for r in rewards]
    emb = http.post("/v1/embeddings", json={"model": "ens", "input": TEXTS}).json()
    assert [d["embedding"] for d in emb["data"]] == [[r] for r in rewards]
    assert emb["model"] == "ens"
    # the same shapes as a single model's answers, key for key
    for route, answer in (("/classify", body), ("/v1/embeddings", emb)):
        single = http.post(route, json={"model": "single", "input": TEXTS}).json()
        assert set(answer) == set(single) and set(answer["data"][0]) == set(single["data"][0])


def test_the_ensemble_is_listed_once_with_its_size(
    http: httpx.Client, channel: grpc.Channel
) -> None:
    rest = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert set(rest) == {"ens", "single"}
    assert rest["ens"]["members"] == 3 and rest["single"]["members"] is None
    stub = scoring_pb2_grpc.RewardServiceStub(channel)
    listed = {m.id: m for m in stub.ListModels(scoring_pb2.ListModelsRequest(), timeout=30).models}
    assert listed["ens"].members == 3 and not listed["single"].HasField("members")


def test_rerank_by_objective_is_the_same_on_both_transports(
    http: httpx.Client, channel: grpc.Channel
) -> None:
    body = {
        "reward_model": "ens",
        "prompt": "\n\nHuman: hi\n\nAssistant:",
        "candidates": ["Hello!", "Go away.", "Hi, how can I help?", "No."],
        "objective": "uncertainty_weighted",
        "uncertainty_lambda": 0.5,
    }
    rest = http.post("/v1/rerank", json=body)
    assert rest.status_code == 200, rest.text
    stub = bon_pb2_grpc.BestOfNServiceStub(channel)
    resp = stub.Rerank(json_format.ParseDict(body, bon_pb2.RerankRequest()), timeout=30)
    via_grpc = json_format.MessageToDict(resp, preserving_proto_field_name=True)
    rest_results = rest.json()["results"]
    assert [r["index"] for r in rest_results] == [r.get("index", 0) for r in via_grpc["results"]]
    for a, b in zip(rest_results, via_grpc["results"], strict=True):
        assert (a["reward"], a["uncertainty"], a["members"]) == (
            b["reward"],
            b["uncertainty"],
            b["members"],
        )
    values = [math.fsum(r["members"]) / 3 - 0.5 * r["uncertainty"] ** 2 for r in rest_results]
    assert values == sorted(values, reverse=True)
    bad = http.post("/v1/rerank", json=body | {"objective": "median"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "objective"
