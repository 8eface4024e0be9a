"""Malformed and abusive requests on both transports: always a 4xx naming the field, never a
500; then admission control under a burst. One server with small limits serves the module."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rewardserve.v1 import scoring_pb2 as pb
from rewardserve.v1 import scoring_pb2_grpc
from servers import RewardServer, pb_request

MAX_ITEMS, MAX_BODY, MAX_CHARS, MAX_QUEUE = 4, 16384, 2000, 8
VALID = {"items": [{"text": "a perfectly fine text"}]}


@pytest.fixture(scope="module")
def server(model_repo) -> Iterator[RewardServer]:
    args = [
        "--max-items-per-request", str(MAX_ITEMS),
        "--max-body-bytes", str(MAX_BODY),
        "--max-text-chars", str(MAX_CHARS),
        "--max-queue-items", str(MAX_QUEUE),
        # a forming batch waits 50 ms for stragglers: a burst really does queue up
        "--max-wait-ms", "50",
    ]  # fmt: skip
    with RewardServer(model_repo, extra_args=args) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: RewardServer) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


@pytest.fixture(scope="module")
def stub(server: RewardServer) -> Iterator[scoring_pb2_grpc.RewardServiceStub]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield scoring_pb2_grpc.RewardServiceStub(ch)


def text(t: object) -> dict:
    return {"text": t}


def items(*its: dict) -> dict:
    return {"items": list(its)}


# X-Request-Timeout values that are not a number of seconds in (0, 3600]
BAD_TIMEOUTS = ["soon", "-1", "0", "nan", "99999", "inf", "", "1,5", "0x10", "3600.5", "5s"]

# (id, body (JSON-able, or raw bytes), extra headers, status, code, field)
J = "application/json"
REST_CASES = [
    ("empty items", items(), {}, 422, "invalid_argument", "items"),
    ("items not a list", {"items": {"text": "x"}}, {}, 422, "invalid_argument", "items"),
    ("items missing", {"model": "rm-a"}, {}, 422, "invalid_argument", "items"),
    ("too many items", items(*[text("x")] * (MAX_ITEMS + 1)), {}, 400, "invalid_argument", "items"),
    ("empty text", items(text("")), {}, 422, "invalid_argument", "items.0.text"),
    ("number text", items(text(42)), {}, 422, "invalid_argument", "items.0.text"),
    ("list text", items(text(["a", "b"])), {}, 422, "invalid_argument", "items.0.text"),
    ("bool text", items(text(True)), {}, 422, "invalid_argument", "items.0.text"),
    ("null text", items(text(None)), {}, 422, "invalid_argument", "items.0"),
    ("second item bad", items(text("ok"), text("")), {}, 422, "invalid_argument", "items.1.text"),
    ("empty item", items({}), {}, 422, "invalid_argument", "items.0"),
    ("missing response", items({"prompt": "p"}), {}, 422, "invalid_argument", "items.0"),
    ("missing prompt", items({"response": "r"}), {}, 422, "invalid_argument", "items.0"),
    ("empty response", items({"prompt": "p", "response": ""}), {}, 422, "invalid_argument",
     "items.0.response"),
    ("text and pair", items({"text": "t", "prompt": "p", "response": "r"}), {}, 422,
     "invalid_argument", "items.0"),
    ("text and messages", items({"text": "t", "messages": [{"role": "user", "content": "c"}]}),
     {}, 422, "invalid_argument", "items.0"),
    ("unknown field", {**VALID, "temperature": 0.5}, {}, 422, "invalid_argument", "temperature"),
    ("unknown item field", items({"text": "t", "weight": 2}), {}, 422, "invalid_argument",
     "items.0.weight"),
    ("bad role", items({"messages": [{"role": "robot", "content": "c"}]}), {}, 422,
     "invalid_argument", "items.0.messages.0.role"),
    ("empty messages", items({"messages": []}), {}, 422, "invalid_argument", "items.0.messages"),
    ("empty content", items({"messages": [{"role": "user", "content": ""}]}), {}, 422,
     "invalid_argument", "items.0.messages.0.content"),
    ("message extra field", items({"messages": [{"role": "user", "content": "c", "name": "x"}]}),
     {}, 422, "invalid_argument", "items.0.messages.0.name"),
    ("unknown model", {**VALID, "model": "no-such-model"}, {}, 404, "not_found", "model"),
    ("model not a string", {**VALID, "model": 7}, {}, 422, "invalid_argument", "model"),
    ("invalid JSON", b'{"items": [{"text": "x"}', {}, 400, "invalid_argument", "body"),
    ("trailing garbage", b'{"items": []} xyz', {}, 400, "invalid_argument", "body"),
    ("empty body", b"", {}, 400, "invalid_argument", "body"),
    ("JSON array", [VALID], {}, 422, "invalid_argument", "body"),
    ("JSON string", "items", {}, 422, "invalid_argument", "body"),
    ("JSON null", None, {}, 400, "invalid_argument", "body"),
    ("text/plain", b"hello", {"Content-Type": "text/plain"}, 415, "invalid_argument",
     "content-type"),
    ("form data", b"items=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "invalid_argument", "content-type"),
    ("body too large", items(text("x" * (MAX_BODY + 10))), {}, 413, "payload_too_large", "body"),
    ("text over max chars", items(text("ok"), text("y" * (MAX_CHARS + 1))), {}, 400,
     "invalid_argument", "items.1"),
    ("messages over max chars", items({"messages": [{"role": "user", "content": "z" * MAX_CHARS}]}),
     {}, 400, "invalid_argument", "items.0"),
    *[(f"timeout {v!r}", VALID, {"X-Request-Timeout": v}, 400, "invalid_argument",
       "x-request-timeout") for v in BAD_TIMEOUTS],
]  # fmt: skip

OTHER_ROUTES = [
    ("/get_reward", {"query": []}, 422, "query"),
    ("/get_reward", {"query": ["x"] * (MAX_ITEMS + 1)}, 400, "query"),
    ("/get_reward", {"query": ["ok", "q" * (MAX_CHARS + 1)]}, 400, "query.1"),
    ("/get_reward", [["x"]], 422, "body"),
    ("/classify", {"input": ["x"] * (MAX_ITEMS + 1)}, 400, "input"),
    ("/classify", {"input": "q" * (MAX_CHARS + 1)}, 400, "input.0"),
    ("/v1/admin/models/load", {}, 422, "model"),
    ("/v1/admin/models/load", {"model": 5}, 422, "model"),
    ("/v1/admin/models/load", {"model": "rm-a", "force": True}, 422, "force"),
    ("/v1/admin/models/unload", {"model": "never-loaded"}, 404, "model"),
]


def post(http: httpx.Client, path: str, body, headers: dict | None = None) -> httpx.Response:
    headers = {"Content-Type": J, **(headers or {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=content, headers=headers)


def assert_error_shape(r: httpx.Response, status: int, code: str, field: str | None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code
    assert body["error"]["field"] == field
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "code", "field"),
    [c[1:] for c in REST_CASES],
    ids=[c[0] for c in REST_CASES],
)
def test_rest_malformed_score_request(http, body, headers, status, code, field) -> None:
    assert_error_shape(post(http, "/v1/score", body, headers), status, code, field)


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    OTHER_ROUTES,
    ids=[f"{p} {json.dumps(b)[:30]}" for p, b, *_ in OTHER_ROUTES],
)
def test_rest_malformed_other_routes(http, path, body, status, field) -> None:
    code = {400: "invalid_argument", 422: "invalid_argument", 404: "not_found"}[status]
    assert_error_shape(post(http, path, body), status, code, field)


def test_rest_body_over_limit_without_content_length(http) -> None:
    big = json.dumps(items(text("x" * (MAX_BODY + 10)))).encode()

    def chunks() -> Iterator[bytes]:  # a generator body is sent chunked: no Content-Length
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    r = http.post("/v1/score", content=chunks(), headers={"Content-Type": J})
    assert "content-length" not in r.request.headers
    assert_error_shape(r, 413, "payload_too_large", "body")


def test_rest_body_just_under_the_limit_is_accepted(http) -> None:
    body = items(text("w " * (MAX_CHARS // 2 - 1)))
    assert len(json.dumps(body)) < MAX_BODY
    r = post(http, "/v1/score", body)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["truncated"] is True


def test_rest_wrong_method_is_a_4xx_json_error(http) -> None:
    r = http.get("/v1/score")
    assert r.status_code == 405
    assert set(r.json()["error"]) == {"code", "message", "field"}


# ---- gRPC ------------------------------------------------------------------------------------


def conv(*msgs: tuple[str, str]) -> pb.ScoreItem:
    return pb.ScoreItem(
        conversation=pb.Conversation(messages=[pb.ChatMessage(role=r, content=c) for r, c in msgs])
    )


G = grpc.StatusCode
GRPC_CASES = [
    ("empty items", pb.ScoreRequest(), G.INVALID_ARGUMENT, "items"),
    ("too many items", pb_request(items(*[text("x")] * (MAX_ITEMS + 1))), G.INVALID_ARGUMENT,
     "items"),
    ("empty text", pb_request(items(text(""))), G.INVALID_ARGUMENT, "items.0.text"),
    ("second item bad", pb_request(items(text("ok"), text(""))), G.INVALID_ARGUMENT,
     "items.1.text"),
    ("item with no input", pb.ScoreRequest(items=[pb.ScoreItem()]), G.INVALID_ARGUMENT, "items.0"),
    ("empty response", pb_request(items({"prompt": "p", "response": ""})), G.INVALID_ARGUMENT,
     "items.0.response"),
    ("empty conversation", pb.ScoreRequest(items=[conv()]), G.INVALID_ARGUMENT,
     "items.0.messages"),
    ("bad role", pb.ScoreRequest(items=[conv(("robot", "hi"))]), G.INVALID_ARGUMENT,
     "items.0.messages.0.role"),
    ("empty role", pb.ScoreRequest(items=[conv(("", "hi"))]), G.INVALID_ARGUMENT,
     "items.0.messages.0.role"),
    ("empty content", pb.ScoreRequest(items=[conv(("user", ""))]), G.INVALID_ARGUMENT,
     "items.0.messages.0.content"),
    ("unknown model", pb_request({**VALID, "model": "no-such-model"}), G.NOT_FOUND, "model"),
    ("text over max chars", pb_request(items(text("y" * (MAX_CHARS + 1)))), G.INVALID_ARGUMENT,
     "items.0"),
    ("third item bad", pb_request(items(text("a"), text("b"), text(""))), G.INVALID_ARGUMENT,
     "items.2.text"),
    ("second message empty", pb.ScoreRequest(items=[conv(("user", "hi"), ("assistant", ""))]),
     G.INVALID_ARGUMENT, "items.0.messages.1.content"),
    ("messages over max chars", pb.ScoreRequest(items=[conv(("user", "z" * MAX_CHARS))]),
     G.INVALID_ARGUMENT, "items.0"),
    ("second item no input", pb.ScoreRequest(items=[pb.ScoreItem(text="ok"), pb.ScoreItem()]),
     G.INVALID_ARGUMENT, "items.1"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_", "status", "field"),
    [c[1:] for c in GRPC_CASES],
    ids=[c[0] for c in GRPC_CASES],
)
def test_grpc_malformed_score_request(stub, request_, status, field) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request_, timeout=10)
    err = info.value
    assert err.code() == status, err.details()
    assert err.details()
    trailers = dict(err.trailing_metadata() or ())
    assert trailers.get("error-field") == field
    assert trailers.get("error-code") in ("invalid_argument", "not_found")


@pytest.mark.parametrize(
    ("request_", "status", "field"),
    [c[1:] for c in GRPC_CASES],
    ids=[c[0] for c in GRPC_CASES],
)
def test_grpc_malformed_stream_request(stub, request_, status, field) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ScoreStream(iter([request_]), timeout=10))
    assert info.value.code() == status
    assert dict(info.value.trailing_metadata() or ()).get("error-field") == field


def test_grpc_message_over_limit_is_resource_exhausted(stub) -> None:
    big = pb_request(items(text("x" * (MAX_BODY + 10))))
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(big, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


NOT_UTF8 = b'{"items": [{"text": "\xff\xfe"}]}'


def test_rest_body_not_utf8_is_a_400_error(http) -> None:
    r = post(http, "/v1/score", NOT_UTF8)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"code", "message", "field"}


def test_rest_body_not_utf8_is_invalid_argument_on_body(http) -> None:
    assert_error_shape(post(http, "/v1/score", NOT_UTF8), 400, "invalid_argument", "body")


def bad_utf8_score(target: str) -> grpc.RpcError:
    # A hand-made ScoreRequest whose one text item holds invalid UTF-8 bytes.
    item = b"\x1a\x02\xff\xfe"  # ScoreItem.text (field 3, length-delimited), 2 bytes
    raw = b"\x12" + bytes([len(item)]) + item  # ScoreRequest.items (field 2)
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary("/rewardserve.v1.RewardService/Score")
        with pytest.raises(grpc.RpcError) as info:
            call(raw, timeout=10)
    return info.value


def test_grpc_undecodable_message_is_refused(server, stub) -> None:
    err = bad_utf8_score(server.grpc_target)
    assert err.code() != grpc.StatusCode.OK
    assert len(stub.Score(pb_request(VALID), timeout=10).results) == 1


def test_grpc_undecodable_message_is_invalid_argument(server) -> None:
    assert bad_utf8_score(server.grpc_target).code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- after the corpus ------------------------------------------------------------------------


def test_server_still_answers_after_the_corpus(server, http, stub) -> None:
    r = post(http, "/v1/score", VALID)
    assert r.status_code == 200, r.text
    resp = stub.Score(pb_request(VALID), timeout=10)
    assert [x.reward for x in resp.results] == [x["reward"] for x in r.json()["results"]]
    assert server.proc is not None and server.proc.poll() is None
    log = server.log_tail(10**7)
    assert "unhandled error" not in log
    assert " 500 " not in log


# ---- deadlines and admission -------------------------------------------------------------------


def test_rest_deadline_exceeded_is_504(http) -> None:
    # Tokenizing a full request of long texts outlasts a 1 ms deadline, which runs from
    # arrival: the items are dropped, not scored.
    body = items(*[text("a long sentence to tokenize " * 40) for _ in range(MAX_ITEMS)])
    r = post(http, "/v1/score", body, {"X-Request-Timeout": "0.001"})
    assert_error_shape(r, 504, "deadline_exceeded", None)


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


BURST = 40


async def test_rest_burst_gets_429_with_retry_after_never_500(server, http) -> None:
    rejected_before = metric(http, "rewardserve_rejected_requests_total", model="rm-a")
    body = items(*[text(f"burst item {i} " * 10) for i in range(MAX_ITEMS)])
    async with httpx.AsyncClient(
        base_url=server.base_url,
        timeout=60,
        trust_env=False,
        limits=httpx.Limits(max_connections=BURST),
    ) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/score", json=body) for _ in range(BURST))
        )
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert 429 in statuses and 200 in statuses, statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            err = r.json()["error"]
            assert err["code"] == "overloaded" and err["field"] is None
        else:
            assert len(r.json()["results"]) == MAX_ITEMS
    rejected = metric(http, "rewardserve_rejected_requests_total", model="rm-a")
    assert rejected - rejected_before == statuses.count(429)
    # recovered: the queue drains and a plain request is served
    assert post(http, "/v1/score", body).status_code == 200
    assert metric(http, "rewardserve_queue_depth", model="rm-a") == 0


async def test_grpc_burst_gets_resource_exhausted_never_internal(server, stub) -> None:
    request_ = pb_request(items(*[text(f"burst item {i} " * 10) for i in range(MAX_ITEMS)]))
    async with grpc.aio.insecure_channel(server.grpc_target) as ch:
        astub = scoring_pb2_grpc.RewardServiceStub(ch)

        async def one() -> tuple[grpc.StatusCode, dict]:
            try:
                await astub.Score(request_, timeout=60)
                return grpc.StatusCode.OK, {}
            except grpc.aio.AioRpcError as e:
                return e.code(), dict(e.trailing_metadata() or ())

        outcomes = await asyncio.gather(*(one() for _ in range(BURST)))
    codes = [c for c, _ in outcomes]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    for code, trailers in outcomes:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert trailers.get("error-code") == "overloaded"
            assert int(trailers["retry-after"]) >= 1
    assert len(stub.Score(request_, timeout=10).results) == MAX_ITEMS
