"""API keys with scopes on both transports: "s1" may score, "a1" may only administer."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rewardserve.v1 import scoring_pb2 as pb
from rewardserve.v1 import scoring_pb2_grpc
from servers import RewardServer, pb_request

SCORE_KEY, ADMIN_KEY = "s1", "a1"
SCORE = {"Authorization": f"Bearer {SCORE_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BODY = {"items": [{"text": "hello there"}]}


@pytest.fixture(scope="module")
def server(model_repo) -> Iterator[RewardServer]:
    # keys through the environment, as a deployment's secret would pass them
    with RewardServer(model_repo, api_keys=[f"{SCORE_KEY}:score", f"{ADMIN_KEY}:admin"]) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: RewardServer) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


@pytest.fixture(scope="module")
def channel(server: RewardServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> scoring_pb2_grpc.RewardServiceStub:
    return scoring_pb2_grpc.RewardServiceStub(channel)


SCORE_ROUTES = [
    ("POST", "/v1/score", BODY),
    ("GET", "/v1/models", None),
    ("GET", "/metrics", None),
    ("POST", "/get_reward", {"query": ["hello"]}),
    ("POST", "/classify", {"input": "hello"}),
]
ADMIN_ROUTES = [
    ("POST", "/v1/admin/models/load", {"model": "rm-b"}),
    ("POST", "/v1/admin/models/unload", {"model": "no-such-model"}),
]
ALL_ROUTES = SCORE_ROUTES + ADMIN_ROUTES
ids = [f"{m} {p}" for m, p, _ in ALL_ROUTES]


def call(http: httpx.Client, method: str, path: str, body, headers=None) -> httpx.Response:
    return http.request(method, path, json=body, headers=headers or {})


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["field"] == "authorization"
    assert err["message"]


@pytest.mark.parametrize(("method", "path", "body"), ALL_ROUTES, ids=ids)
def test_no_key_is_401(http, method, path, body) -> None:
    assert_error(call(http, method, path, body), 401, "unauthenticated")


@pytest.mark.parametrize(("method", "path", "body"), ALL_ROUTES, ids=ids)
@pytest.mark.parametrize(
    "authorization",
    ["Bearer wrong", "Bearer s1x", "Bearer", "Basic czE6", "s1", f"Bearer {SCORE_KEY[:-1]}"],
)
def test_wrong_key_is_401(http, method, path, body, authorization) -> None:
    r = call(http, method, path, body, {"Authorization": authorization})
    assert_error(r, 401, "unauthenticated")


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_score_key_on_admin_route_is_403(http, method, path, body) -> None:
    assert_error(call(http, method, path, body, SCORE), 403, "permission_denied")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [r for r in SCORE_ROUTES if r[1] != "/metrics"],
    ids=[f"{m} {p}" for m, p, _ in SCORE_ROUTES if p != "/metrics"],
)
def test_admin_key_on_score_route_is_403(http, method, path, body) -> None:
    assert_error(call(http, method, path, body, ADMIN), 403, "permission_denied")


@pytest.mark.parametrize(("method", "path", "body"), SCORE_ROUTES, ids=ids[: len(SCORE_ROUTES)])
def test_score_key_works(http, method, path, body) -> None:
    r = call(http, method, path, body, SCORE)
    assert r.status_code == 200, r.text


def test_bearer_scheme_is_case_insensitive(http) -> None:
    r = http.post("/v1/score", json=BODY, headers={"Authorization": f"bearer {SCORE_KEY}"})
    assert r.status_code == 200, r.text


def test_any_key_may_read_metrics(http) -> None:
    assert http.get("/metrics", headers=ADMIN).status_code == 200


def test_admin_key_can_unload_and_load(http) -> None:
    r = http.post("/v1/admin/models/unload", json={"model": "rm-b"}, headers=ADMIN)
    try:
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "available"
        r = http.post("/v1/score", json={"model": "rm-b", **BODY}, headers=SCORE)
        assert r.status_code == 404
    finally:
        r = http.post("/v1/admin/models/load", json={"model": "rm-b"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "loaded"
    r = http.post("/v1/score", json={"model": "rm-b", **BODY}, headers=SCORE)
    assert r.status_code == 200, r.text


def test_health_needs_no_key(http, channel) -> None:
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200
    health = health_pb2_grpc.HealthStub(channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


# ---- gRPC ------------------------------------------------------------------------------------


def grpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if not isinstance(result, pb.ScoreResponse | pb.ListModelsResponse):
            list(result)  # a stream raises while it is read
    return info.value


GRPC_CALLS = {
    "Score": lambda stub, md: stub.Score(pb_request(BODY), metadata=md, timeout=10),
    "ListModels": lambda stub, md: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10),
    "ScoreStream": lambda stub, md: stub.ScoreStream(
        iter([pb_request(BODY)]), metadata=md, timeout=10
    ),
}


@pytest.mark.parametrize("rpc", list(GRPC_CALLS))
@pytest.mark.parametrize(
    "metadata",
    [None, (("authorization", "Bearer nope"),), (("authorization", SCORE_KEY),)],
    ids=["none", "wrong", "no scheme"],
)
def test_grpc_without_a_valid_key_is_unauthenticated(stub, rpc, metadata) -> None:
    err = grpc_error(GRPC_CALLS[rpc], stub, metadata)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    trailers = dict(err.trailing_metadata() or ())
    assert trailers.get("error-field") == "authorization"
    assert trailers.get("error-code") == "unauthenticated"


@pytest.mark.parametrize("rpc", list(GRPC_CALLS))
def test_grpc_admin_only_key_is_permission_denied(stub, rpc) -> None:
    err = grpc_error(GRPC_CALLS[rpc], stub, (("authorization", f"Bearer {ADMIN_KEY}"),))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_grpc_with_score_key_works(stub, http) -> None:
    md = (("authorization", f"Bearer {SCORE_KEY}"),)
    resp = stub.Score(pb_request(BODY), metadata=md, timeout=10)
    rest = http.post("/v1/score", json=BODY, headers=SCORE).json()
    assert [r.reward for r in resp.results] == [r["reward"] for r in rest["results"]]
    models = stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10).models
    assert "rm-a" in {m.id for m in models}
    streamed = list(stub.ScoreStream(iter([pb_request(BODY)] * 3), metadata=md, timeout=10))
    assert len(streamed) == 3
