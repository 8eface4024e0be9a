"""Composite rewards over REST, gRPC and OpenRLHF's /get_reward, against a real server whose
default reward model is a composite of a tiny reward model and rule parts."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest

from builders import build_tiny_rm, write_manifest
from rewardserve.client import RewardClient
from rewardserve.v1 import scoring_pb2_grpc
from servers import RewardServer, pb_request, pb_response_dict, sharpen_weights

PROMPT = "<|user|>\nwhat is 2+2?\n<|assistant|>\n"
QUERIES = [PROMPT + "4", PROMPT + "it is four, " * 8, PROMPT + "5"]
PARTS = [
    {"name": "rm", "model": "rm-a", "weight": 1.0},
    {"name": "brevity", "rule": "length_penalty", "weight": 0.5, "params": {"target": 2, "per": 4}},
    {"name": "correct", "rule": "exact_match", "weight": 2.0},
]
WEIGHTS = {p["name"]: p["weight"] for p in PARTS}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RewardServer]:
    root = tmp_path_factory.mktemp("composite") / "models"
    sharpen_weights(build_tiny_rm(root, "rm-a", seed=0), 1)
    write_manifest(
        root / "mix", name="mix", kind="reward", default=True, composite={"parts": PARTS}
    )
    with RewardServer(root) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: RewardServer) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: RewardServer) -> Iterator[scoring_pb2_grpc.RewardServiceStub]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield scoring_pb2_grpc.RewardServiceStub(channel)


def rest(http: httpx.Client, body: dict) -> dict:
    r = http.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    return r.json()


BODY = {
    "model": "mix",
    "items": [
        {"prompt": "Q: 2+2?\nA:", "response": "4", "label": "4"},
        {"text": "\n\nHuman: 2+2?\n\nAssistant: four four four four four four", "label": "4"},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant",
                                                            "content": "5"}], "label": "4"},
    ],
}  # fmt: skip


@pytest.mark.parametrize("weights", [None, {"correct": 0.25, "rm": -1.0}])
def test_rest_and_grpc_agree_to_the_last_bit(http, stub, weights) -> None:
    body = BODY | ({"weights": weights} if weights else {})
    via_rest = rest(http, body)
    assert via_rest == pb_response_dict(stub.Score(pb_request(body), timeout=30))
    w = WEIGHTS | (weights or {})
    results = via_rest["results"]
    assert [r["parts"]["correct"] for r in results] == [1.0, 0.0, 0.0]
    assert [r["parts"]["brevity"] for r in results] == [0.0, -1.0, 0.0]  # 6 words: 4 over
    for r in results:
        assert r["reward"] == sum(w[k] * v for k, v in r["parts"].items())
        assert r["normalized_reward"] == r["reward"]


def test_the_python_client_sends_labels_and_weights(server: RewardServer, http) -> None:
    with RewardClient(server.grpc_target) as client:
        resp = client.score(BODY["items"], "mix", weights={"correct": 0.25})
    assert resp.model_dump() == rest(http, BODY | {"weights": {"correct": 0.25}})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "mix", "items": [{"text": "x"}]}, "items.0.label"),
        ({"model": "mix", "items": [{"text": "x", "label": "4"}], "weights": {"zz": 1}},
         "weights.zz"),
        ({"model": "rm-a", "items": [{"text": "x"}], "weights": {"rm": 1}}, "weights"),
    ],
    ids=["no label", "unknown part", "plain model"],
)  # fmt: skip
def test_bad_requests_are_400_naming_the_field_on_both(http, stub, body, field) -> None:
    r = http.post("/v1/score", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(pb_request(body), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(e.value.trailing_metadata())["error-field"] == field


def test_models_lists_the_composite_loaded(http) -> None:
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models["mix"]["status"] == "loaded" and models["mix"]["default"]


# ---- OpenRLHF --------------------------------------------------------------------------------


def test_get_reward_labels_are_the_reference_answers(http) -> None:
    payload = {"query": QUERIES, "prompts": [PROMPT] * 3, "labels": ["4", "4", 4]}
    r = http.post("/get_reward", json=payload)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"rewards", "scores", "extra_logs"}
    logs = body["extra_logs"]
    assert logs["correct"] == [1.0, 0.0, 0.0]  # the response is the query after its prompt
    assert logs["brevity"] == [0.0, -5.5, 0.0]  # "it is four, " x 8: 24 words, 22 over
    plain = rest(http, {"model": "rm-a", "items": [{"text": q} for q in QUERIES]})
    assert logs["rm"] == [x["normalized_reward"] for x in plain["results"]]
    for i, reward in enumerate(body["rewards"]):
        assert reward == sum(WEIGHTS[k] * logs[k][i] for k in WEIGHTS)
    assert body["scores"] == body["rewards"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"query": QUERIES}, "query.0.label"),
        ({"query": QUERIES, "labels": ["4"]}, "labels"),
        ({"query": QUERIES[:1], "labels": [{"a": 1}]}, "labels.0"),
    ],
    ids=["no labels", "too few labels", "label not a string"],
)
def test_get_reward_bad_labels(http, payload, field) -> None:
    r = http.post("/get_reward", json=payload)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field
