"""Scoring over REST and gRPC against a real `rewardserve serve` subprocess."""

from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from builders import build_tiny_rm
from rewardserve.v1 import scoring_pb2 as pb
from servers import RewardServer, pb_request, pb_response_dict, sharpen_weights

SHORT = "\n\nHuman: is the sky blue?\n\nAssistant: yes it is"
LONG = "\n\nHuman: tell me a story\n\nAssistant: " + "once upon a time a cat sat " * 4
PAIR = {"prompt": "\n\nHuman: what is two plus two?\n\nAssistant:", "response": "four"}
CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there, how can I help?"},
    ]
}
STATS = {"rm-a": (0.5, 2.0), "rm-b": (-1.0, 4.0), "orlhf": (0.1, 3.0)}


def rest_score(http: httpx.Client, body: dict) -> dict:
    r = http.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def grpc_score(stub, body: dict) -> dict:
    return pb_response_dict(stub.Score(pb_request(body), timeout=30))


# ---- the same answer on both transports --------------------------------------------------


@pytest.mark.parametrize("model", [None, "rm-a", "rm-b", "orlhf"])
def test_rest_and_grpc_return_identical_floats(plain_http, plain_stub, model) -> None:
    body = {"model": model, "items": [{"text": SHORT}, PAIR, CHAT, {"text": LONG}]}
    rest = rest_score(plain_http, body)
    via_grpc = grpc_score(plain_stub, body)
    assert rest == via_grpc  # to the last bit: same engine, same batch
    assert rest["model"] == (model or "rm-a")
    assert [r["index"] for r in rest["results"]] == [0, 1, 2, 3]
    assert rest["usage"]["total_tokens"] == sum(r["tokens"] for r in rest["results"])


@pytest.mark.parametrize("item", [{"text": SHORT}, PAIR, CHAT], ids=["text", "pair", "chat"])
def test_each_item_form_alone_is_identical_on_both_transports(plain_http, plain_stub, item):
    body = {"items": [item]}
    assert rest_score(plain_http, body) == grpc_score(plain_stub, body)


def test_pair_and_chat_forms_render_like_their_hh_text(plain_http) -> None:
    text = PAIR["prompt"] + " " + PAIR["response"]
    hh = "\n\nSystem: be brief\n\nHuman: hello\n\nAssistant: hi there, how can I help?"
    got = rest_score(plain_http, {"items": [PAIR]})["results"][0]
    assert got == rest_score(plain_http, {"items": [{"text": text}]})["results"][0]
    got = rest_score(plain_http, {"items": [CHAT]})["results"][0]
    assert got == rest_score(plain_http, {"items": [{"text": hh}]})["results"][0]


def test_results_carry_index_in_request_order(plain_http) -> None:
    texts = [LONG * 2, "hi", LONG, "a short one", SHORT]
    alone = [rest_score(plain_http, {"items": [{"text": t}]})["results"][0] for t in texts]
    together = rest_score(plain_http, {"items": [{"text": t} for t in texts]})["results"]
    assert [r["index"] for r in together] == list(range(len(texts)))
    for a, b in zip(alone, together, strict=True):
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-5)
        assert b["tokens"] == a["tokens"]
    assert together[0]["truncated"] and not together[1]["truncated"]
    assert together[0]["tokens"] == 64


@pytest.mark.parametrize("model", ["rm-a", "rm-b", "orlhf"])
def test_normalized_reward_uses_the_models_stats(plain_http, model) -> None:
    mean, std = STATS[model]
    for r in rest_score(plain_http, {"model": model, "items": [{"text": SHORT}]})["results"]:
        assert r["normalized_reward"] == pytest.approx((r["reward"] - mean) / std, abs=1e-9)


def test_models_are_selected_by_name(plain_http, plain_stub) -> None:
    rewards = {}
    for model in ("rm-a", "rm-b", "orlhf"):
        body = {"model": model, "items": [{"text": SHORT}]}
        rest = rest_score(plain_http, body)
        assert rest["model"] == model
        assert grpc_score(plain_stub, body) == rest
        rewards[model] = rest["results"][0]["reward"]
    assert len({round(v, 4) for v in rewards.values()}) == 3, rewards


# ---- models ----------------------------------------------------------------------------


def test_rest_and_grpc_model_lists_agree(plain_http, plain_stub) -> None:
    rest = plain_http.get("/v1/models")
    assert rest.status_code == 200
    body = rest.json()
    assert body["object"] == "list"
    rest_models = {m["id"]: m for m in body["data"]}
    grpc_models = {m.id: m for m in plain_stub.ListModels(pb.ListModelsRequest()).models}
    assert set(rest_models) == set(grpc_models) >= {"rm-a", "rm-b", "orlhf", "policy-x", "broken"}
    for name, m in rest_models.items():
        g = grpc_models[name]
        assert m["object"] == "model"
        assert (m["kind"], m["status"], m["default"]) == (g.kind, g.status, g.default)
        assert (m["max_length"], m["description"]) == (g.max_length, g.description)
        assert (m["error"] or "") == g.error
    assert {n: m["status"] for n, m in rest_models.items() if n in STATS} == dict.fromkeys(
        STATS, "loaded"
    )
    assert rest_models["rm-a"]["default"] and not rest_models["rm-b"]["default"]
    assert rest_models["policy-x"]["kind"] == "policy"
    assert rest_models["policy-x"]["status"] == "available"
    assert rest_models["broken"]["status"] == "error"
    assert "YAML" in rest_models["broken"]["error"]


# ---- streaming ---------------------------------------------------------------------------


def stream_requests() -> list[pb.ScoreRequest]:
    models = ["rm-a", "rm-b", "orlhf", "", "rm-b", "rm-a", "orlhf", ""]
    reqs = []
    for i, model in enumerate(models):
        body = {"model": model, "items": [{"text": f"{SHORT} number {j}"} for j in range(i + 1)]}
        reqs.append(pb_request(body))
    return reqs


def test_score_stream_answers_in_order(plain_stub) -> None:
    reqs = stream_requests()
    unary = [pb_response_dict(plain_stub.Score(r, timeout=30)) for r in reqs]
    streamed = [pb_response_dict(r) for r in plain_stub.ScoreStream(iter(reqs), timeout=60)]
    assert len(streamed) == len(reqs)
    for want, got in zip(unary, streamed, strict=True):
        assert got["model"] == want["model"]
        assert len(got["results"]) == len(want["results"])
        for a, b in zip(want["results"], got["results"], strict=True):
            assert b["index"] == a["index"] and b["tokens"] == a["tokens"]
            # concurrently scored stream requests may share a padded batch
            assert b["reward"] == pytest.approx(a["reward"], abs=1e-5)


def test_score_stream_ends_with_the_status_of_a_bad_request(plain_stub) -> None:
    good = pb_request({"items": [{"text": SHORT}]})
    bad = pb.ScoreRequest(items=[pb.ScoreItem(text="")])
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for resp in plain_stub.ScoreStream(iter([good, good, bad, good]), timeout=30):
            got.append(resp)
    assert len(got) == 2
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("error-field", "items.0.text") in tuple(info.value.trailing_metadata())


# ---- health, metrics, docs, reflection ------------------------------------------------


def test_health_and_readiness(plain_http) -> None:
    r = plain_http.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = plain_http.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] is True
    assert set(body["expected"]) == set(STATS)
    assert set(body["loaded"]) >= set(STATS)


def metric_samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_prometheus_metrics(plain_http, plain_stub) -> None:
    rest_score(plain_http, {"model": "rm-b", "items": [{"text": SHORT}, {"text": LONG}]})
    grpc_score(plain_stub, {"model": "rm-b", "items": [{"text": SHORT}]})
    r = plain_http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    for name in ("rewardserve_requests_total", "rewardserve_batch_size", "rewardserve_queue_depth"):
        assert f"# TYPE {name}" in r.text or f"# TYPE {name.removesuffix('_total')}" in r.text
    samples = metric_samples(r.text)

    def value(name: str, **labels: str) -> float:
        for s in samples.get(name, []):
            if all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        raise AssertionError(f"no sample {name}{labels}")

    assert value("rewardserve_requests_total", transport="http", route="/v1/score", code="200")
    assert value("rewardserve_requests_total", transport="grpc", route="Score", code="OK")
    assert value("rewardserve_batch_size_count", model="rm-b") >= 2
    assert value("rewardserve_batch_size_sum", model="rm-b") >= 3
    assert value("rewardserve_queue_depth", model="rm-b") == 0  # idle
    assert value("rewardserve_items_total", model="rm-b") >= 3


def test_openapi_is_served(plain_http) -> None:
    r = plain_http.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path in ("/v1/score", "/v1/models", "/get_reward", "/classify", "/healthz"):
        assert path in paths
    assert "post" in paths["/v1/score"]


def test_unknown_route_is_a_json_404(plain_http) -> None:
    r = plain_http.get("/v1/nothing-here")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_grpc_health_reports_serving(plain_channel) -> None:
    stub = health_pb2_grpc.HealthStub(plain_channel)
    for service in ("", "rewardserve.v1.RewardService"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_reflection_lists_the_service(plain_channel) -> None:
    db = ProtoReflectionDescriptorDatabase(plain_channel)
    services = db.get_services()
    assert "rewardserve.v1.RewardService" in services
    assert "grpc.health.v1.Health" in services
    fd = db.FindFileContainingSymbol("rewardserve.v1.RewardService")
    (svc,) = [s for s in fd.service if s.name == "RewardService"]
    assert {m.name for m in svc.method} == {"Score", "ScoreStream", "ListModels"}


# ---- admin load / unload --------------------------------------------------------------------


def statuses(http: httpx.Client) -> dict[str, str]:
    return {m["id"]: m["status"] for m in http.get("/v1/models").json()["data"]}


def admin(http: httpx.Client, action: str, model: str) -> httpx.Response:
    return http.post(f"/v1/admin/models/{action}", json={"model": model})


def test_unload_and_load_a_named_model(plain_http, plain_stub) -> None:
    body = {"model": "rm-b", "items": [{"text": SHORT}]}
    before = rest_score(plain_http, body)
    r = admin(plain_http, "unload", "rm-b")
    try:
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "rm-b" and r.json()["status"] == "available"
        assert statuses(plain_http)["rm-b"] == "available"
        assert {m.id: m.status for m in plain_stub.ListModels(pb.ListModelsRequest()).models}[
            "rm-b"
        ] == "available"
        r = plain_http.post("/v1/score", json=body)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found" and r.json()["error"]["field"] == "model"
        with pytest.raises(grpc.RpcError) as info:
            plain_stub.Score(pb_request(body), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert ("error-field", "model") in tuple(info.value.trailing_metadata())
        assert admin(plain_http, "unload", "rm-b").status_code == 404  # not loaded any more
        assert rest_score(plain_http, {"items": [{"text": SHORT}]})["model"] == "rm-a"
    finally:
        r = admin(plain_http, "load", "rm-b")
    assert r.status_code == 200 and r.json()["status"] == "loaded"
    assert statuses(plain_http)["rm-b"] == "loaded"
    assert rest_score(plain_http, body) == before  # same weights, same floats


def test_unloaded_default_gives_503_not_another_model(plain_http, plain_stub) -> None:
    default_body = {"items": [{"text": SHORT}]}
    before = rest_score(plain_http, default_body)
    assert admin(plain_http, "unload", "rm-a").status_code == 200
    try:
        r = plain_http.post("/v1/score", json=default_body)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "unavailable"
        assert "rm-a" in r.json()["error"]["message"]
        with pytest.raises(grpc.RpcError) as info:
            plain_stub.Score(pb_request(default_body), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        r = plain_http.post("/v1/score", json={"model": "rm-a", **default_body})
        assert r.status_code == 404
        assert rest_score(plain_http, {"model": "orlhf", **default_body})["model"] == "orlhf"
        assert plain_http.get("/readyz").status_code == 503  # a start-up model is missing
    finally:
        r = admin(plain_http, "load", "rm-a")
    assert r.status_code == 200
    assert plain_http.get("/readyz").status_code == 200
    assert rest_score(plain_http, default_body) == before


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [("no-such", 404, "not_found"), ("policy-x", 400, "invalid_argument"), ("broken", 400, None)],
)
def test_admin_load_refusals(plain_http, model, status, code) -> None:
    r = admin(plain_http, "load", model)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == "model"
    assert err["code"] == (code or "invalid_argument")
    assert statuses(plain_http).get(model) != "loaded"


def test_admin_loads_a_model_added_at_run_time(plain_server: RewardServer, plain_http) -> None:
    sharpen_weights(build_tiny_rm(plain_server.model_repository, "rm-late", seed=9), 19)
    body = {"model": "rm-late", "items": [{"text": SHORT}]}
    assert plain_http.post("/v1/score", json=body).status_code == 404
    r = admin(plain_http, "load", "rm-late")
    try:
        assert r.status_code == 200, r.text
        assert statuses(plain_http)["rm-late"] == "loaded"
        assert rest_score(plain_http, body)["model"] == "rm-late"
    finally:
        assert admin(plain_http, "unload", "rm-late").status_code == 200
    assert plain_http.post("/v1/score", json=body).status_code == 404
