"""API keys with scopes on both transports: "s1" may score, "a1" may only administer.

Every REST route of the app and every RPC of the rewardserve.v1 protos is enumerated and
tried without a key, with wrong keys and with a key that lacks its scope, so a route or RPC
added without a scope declaration fails here. Only OPEN_ROUTES / OPEN_SERVICES need no key.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from starlette.routing import BaseRoute

import rewardserve.v1
from rewardserve import auth
from rewardserve.config import Settings
from rewardserve.grpc.auth import rpc_scope
from rewardserve.http.app import build_app, schema_paths
from rewardserve.http.auth import declared_scope
from rewardserve.v1 import scoring_pb2 as pb
from rewardserve.v1 import scoring_pb2_grpc
from servers import RewardServer, pb_request

SCORE_KEY, ADMIN_KEY = "s1", "a1"
SCORE = {"Authorization": f"Bearer {SCORE_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BODY = {"items": [{"text": "hello there"}]}
# the key that lacks each scope
LACKING = {auth.SCORE: ADMIN_KEY, auth.ADMIN: SCORE_KEY}
WRONG_AUTHORIZATIONS = [
    "Bearer wrong",
    "Bearer s1x",
    "Bearer",
    "Basic czE6",
    "s1",
    f"Bearer {SCORE_KEY[:-1]}",
    "Bearer é".encode(),
    b"Bearer \xe9",
]

# The only routes and services that need no key. Adding to these lists is a decision.
OPEN_ROUTES = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
OPEN_SERVICES = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


# ---- what the app and the protos declare -----------------------------------------------------


def _app_routes() -> tuple[list[BaseRoute], set[str]]:
    app = build_app(Settings(model_repository=Path("/nonexistent-rewardserve-repo")))
    return list(app.routes), schema_paths(app)


ROUTES, SCHEMA_PATHS = _app_routes()
ENDPOINTS = sorted(
    (method, route.path)
    for route in ROUTES
    for method in (getattr(route, "methods", None) or {"GET"}) - {"HEAD"}
)
SCOPE_OF = {route.path: declared_scope(route, SCHEMA_PATHS) for route in ROUTES}
GUARDED = [(m, p) for m, p in ENDPOINTS if p not in OPEN_ROUTES]


def _methods():
    for info in pkgutil.iter_modules(rewardserve.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"rewardserve.v1.{info.name}")
            for service in module.DESCRIPTOR.services_by_name.values():
                yield from service.methods


METHODS = {f"/{m.containing_service.full_name}/{m.name}": m for m in _methods()}


def test_every_route_declares_one_scope_and_only_the_allow_list_is_open() -> None:
    assert len(ENDPOINTS) >= 12, ENDPOINTS  # the enumeration itself sees the app
    undeclared = sorted(p for p, s in SCOPE_OF.items() if s is None)
    assert not undeclared, f"routes without `dependencies=[Depends(require(...))]`: {undeclared}"
    assert {p for p, s in SCOPE_OF.items() if s == "open"} == OPEN_ROUTES


def test_every_rpc_declares_a_scope() -> None:
    assert {"/rewardserve.v1.RewardService/Score", "/rewardserve.v1.BestOfNService/BestOfN"} <= set(
        METHODS
    )
    undeclared = sorted(m for m in METHODS if rpc_scope(m) is None)
    assert not undeclared, f"RPCs missing from grpc/auth.py RPC_SCOPES: {undeclared}"
    assert all(rpc_scope(m) != "open" for m in METHODS)
    for service in OPEN_SERVICES:
        assert rpc_scope(f"/{service}/Anything") == "open"


# ---- a server with keys ----------------------------------------------------------------------


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


def call(http: httpx.Client, method: str, path: str, headers=None) -> httpx.Response:
    # a body that would be a 422 if it were ever parsed: auth comes first
    content = b'{"not": "valid for any route"}' if method == "POST" else None
    return http.request(
        method,
        path,
        content=content,
        headers={"content-type": "application/json", **(headers or {})},
    )


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["field"] == "authorization"
    assert err["message"]
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


ids = [f"{m} {p}" for m, p in GUARDED]


@pytest.mark.parametrize(("method", "path"), GUARDED, ids=ids)
def test_no_key_is_401(http, method, path) -> None:
    assert_error(call(http, method, path), 401, "unauthenticated")


@pytest.mark.parametrize(("method", "path"), GUARDED, ids=ids)
@pytest.mark.parametrize("authorization", WRONG_AUTHORIZATIONS)
def test_wrong_key_is_401(http, method, path, authorization) -> None:
    r = call(http, method, path, {"Authorization": authorization})
    assert_error(r, 401, "unauthenticated")


@pytest.mark.parametrize(("method", "path"), GUARDED, ids=ids)
def test_a_key_lacking_the_scope_is_403(http, method, path) -> None:
    scope = SCOPE_OF[path]
    if scope == auth.ANY:
        # every valid key holds "any"; no key lacks it
        assert call(http, method, path, ADMIN).status_code not in (401, 403)
        return
    r = call(http, method, path, {"Authorization": f"Bearer {LACKING[scope]}"})
    assert_error(r, 403, "permission_denied")


@pytest.mark.parametrize(("method", "path"), [e for e in ENDPOINTS if e[1] in OPEN_ROUTES])
def test_open_routes_need_no_key(http, method, path) -> None:
    assert http.request(method, path).status_code == 200


def test_unknown_path_needs_a_key_then_is_404(http) -> None:
    assert_error(http.post("/v1/nope", content=b"x" * 100), 401, "unauthenticated")
    assert http.post("/v1/nope", json={}, headers=SCORE).status_code == 404


# ---- auth before the body ----------------------------------------------------------------


def test_unauthenticated_bad_json_or_content_type_is_401(http) -> None:
    for content, ctype in [(b"{not json", "application/json"), (b"x", "text/plain")]:
        r = http.post("/v1/score", content=content, headers={"content-type": ctype})
        assert_error(r, 401, "unauthenticated")
    # with a key the body checks still answer
    r = http.post(
        "/v1/score", content=b"{not json", headers={"content-type": "application/json", **SCORE}
    )
    assert r.status_code == 400 and r.json()["error"]["field"] == "body"
    r = http.post("/v1/score", content=b"x", headers={"content-type": "text/plain", **SCORE})
    assert r.status_code == 415


def raw_request(server: RewardServer, head: str, body: bytes = b"") -> bytes:
    """Send a request head (and maybe part of a body), then read what comes back, without
    ever sending the rest of the body the head announces."""
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks) and b'"error"' in b"".join(chunks):
                break
        return b"".join(chunks)


def head(path: str, length: int, extra: str = "") -> str:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}"
    )


@pytest.mark.parametrize("length", [9 * 1024 * 1024, 64 * 1024 * 1024, 1000])
def test_unauthenticated_body_is_refused_without_being_read(server, length) -> None:
    # The body is never sent: a server that read it first would wait for it, or answer 413.
    response = raw_request(server, head("/v1/score", length), b'{"items": [')
    assert response.startswith(b"HTTP/1.1 401"), response[:300]
    assert b"connection: close" in response.lower()
    assert b'"unauthenticated"' in response


def test_unauthenticated_chunked_body_is_refused_without_being_read(server) -> None:
    h = "POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    h += "Transfer-Encoding: chunked\r\n"
    response = raw_request(server, h, b"100000\r\n" + b"x" * 1000)
    assert response.startswith(b"HTTP/1.1 401"), response[:300]


def test_authenticated_oversized_body_is_still_413(server, http) -> None:
    response = raw_request(
        server, head("/v1/score", 9 * 1024 * 1024, f"Authorization: Bearer {SCORE_KEY}\r\n")
    )
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    # and the server serves on
    assert http.post("/v1/score", json=BODY, headers=SCORE).status_code == 200


# ---- what valid keys may do --------------------------------------------------------------

WORKING = [
    ("POST", "/v1/score", BODY),
    ("GET", "/v1/models", None),
    ("GET", "/metrics", None),
    ("POST", "/get_reward", {"query": ["hello"]}),
    ("POST", "/classify", {"input": "hello"}),
]


@pytest.mark.parametrize(
    ("method", "path", "body"), WORKING, ids=[f"{m} {p}" for m, p, _ in WORKING]
)
def test_score_key_works(http, method, path, body) -> None:
    r = http.request(method, path, json=body, headers=SCORE)
    assert r.status_code == 200, r.text


def test_bearer_scheme_is_case_insensitive(http) -> None:
    r = http.post("/v1/score", json=BODY, headers={"Authorization": f"bearer {SCORE_KEY}"})
    assert r.status_code == 200, r.text


def test_any_key_may_read_metrics(http) -> None:
    assert http.get("/metrics", headers=ADMIN).status_code == 200


def test_refusals_are_counted_by_route(http) -> None:
    http.post("/v1/score", json=BODY)
    metrics = http.get("/metrics", headers=SCORE).text
    assert 'rewardserve_requests_total{code="401",route="/v1/score",transport="http"}' in metrics


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


def test_health_and_reflection_need_no_key(http, channel) -> None:
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200
    health = health_pb2_grpc.HealthStub(channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = list(reflect.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in answer.list_services_response.service}
    assert "rewardserve.v1.RewardService" in names


# ---- gRPC ------------------------------------------------------------------------------------


def invoke(channel: grpc.Channel, path: str, metadata) -> grpc.RpcError | None:
    """Call any RPC with an empty request (of its own type); the error, or None."""
    method = METHODS[path]
    request = message_factory.GetMessageClass(method.input_type)()
    response = message_factory.GetMessageClass(method.output_type)
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    rpc = kind(
        path,
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )
    try:
        result = rpc(
            iter([request]) if method.client_streaming else request, metadata=metadata, timeout=10
        )
        if method.server_streaming:
            list(result)
    except grpc.RpcError as e:
        return e
    return None


def assert_grpc_error(err: grpc.RpcError | None, code: grpc.StatusCode) -> None:
    assert err is not None, "the call succeeded"
    assert err.code() == code, err.details()
    trailers = dict(err.trailing_metadata() or ())
    assert trailers.get("error-field") == "authorization"


@pytest.mark.parametrize("path", sorted(METHODS))
@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", "Bearer nope"),),
        (("authorization", SCORE_KEY),),
        (("authorization", "Bearer"),),
    ],
    ids=["none", "wrong", "no scheme", "no key"],
)
def test_grpc_without_a_valid_key_is_unauthenticated(channel, path, metadata) -> None:
    err = invoke(channel, path, metadata)
    assert_grpc_error(err, grpc.StatusCode.UNAUTHENTICATED)
    assert dict(err.trailing_metadata())["error-code"] == "unauthenticated"


@pytest.mark.parametrize("path", sorted(METHODS))
def test_grpc_key_lacking_the_scope_is_permission_denied(channel, path) -> None:
    scope = rpc_scope(path)
    assert scope in LACKING, scope
    err = invoke(channel, path, (("authorization", f"Bearer {LACKING[scope]}"),))
    assert_grpc_error(err, grpc.StatusCode.PERMISSION_DENIED)


def test_grpc_with_score_key_works(stub, http) -> None:
    md = (("authorization", f"Bearer {SCORE_KEY}"),)
    resp = stub.Score(pb_request(BODY), metadata=md, timeout=10)
    rest = http.post("/v1/score", json=BODY, headers=SCORE).json()
    assert [r.reward for r in resp.results] == [r["reward"] for r in rest["results"]]
    models = stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10).models
    assert "rm-a" in {m.id for m in models}
    streamed = list(stub.ScoreStream(iter([pb_request(BODY)] * 3), metadata=md, timeout=10))
    assert len(streamed) == 3


# ---- exposure ------------------------------------------------------------------------------


def serve_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARDSERVE_")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_an_exposed_address_without_keys_is_refused(model_repo, tmp_path) -> None:
    host = "0.0.0.0"  # which addresses count as exposed: tests/unit/test_api_keys.py
    args = [sys.executable, "-m", "rewardserve.cli", "serve", "--host", host]
    args += ["--model-repository", str(model_repo), "--cache-dir", str(tmp_path)]
    done = subprocess.run(args, env=serve_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"refusing to serve {host} without API keys" in done.stderr
    assert "--allow-insecure" in done.stderr and "--api-keys" in done.stderr
    # refused before anything loaded or listened
    assert "Traceback" not in done.stderr
    assert "ready" not in done.stderr + done.stdout and "listening" not in done.stderr


def test_allow_insecure_serves_an_exposed_address_open(tmp_path) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    args = ["--host", "0.0.0.0", "--allow-insecure"]
    with RewardServer(empty, extra_args=args, grpc_enabled=False) as s, s.http() as client:
        assert client.get("/v1/models").status_code == 200
        assert "without API keys (--allow-insecure)" in s.log_tail()


def test_bad_api_keys_stop_serve_with_a_message(tmp_path) -> None:
    args = [sys.executable, "-m", "rewardserve.cli", "serve", "--model-repository", str(tmp_path)]
    env = {**serve_env(), "REWARDSERVE_API_KEYS": "s1:score;a1:scroe"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "api_keys" in done.stderr and "unknown scope 'scroe'" in done.stderr
    assert "Traceback" not in done.stderr and "s1" not in done.stderr
