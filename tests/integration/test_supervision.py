"""The batcher under faults on a real server: a model whose loop dies, a client that leaves.

rc-short is a real (remote-code) model that answers a batch of k > 1 items with one reward,
so a two-item request kills its batcher loop through the real loading and forward path.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from builders import ROW_DROPPING_LOGITS, build_remote_code_rm, build_tiny_rm
from rewardserve.v1 import scoring_pb2 as pb
from rewardserve.v1 import scoring_pb2_grpc
from servers import RewardServer, pb_request

TWO = {"model": "rc-short", "items": [{"text": "first text"}, {"text": "second text"}]}
ONE = {"model": "rc-short", "items": [{"text": "first text"}]}


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RewardServer]:
    root = tmp_path_factory.mktemp("faulty") / "models"
    build_tiny_rm(root, "rm-a", default=True)
    build_remote_code_rm(root, "rc-short", ROW_DROPPING_LOGITS)
    args = [
        "--allow-trust-remote-code",
        "--batcher-max-restarts",
        "1",
        "--batcher-restart-backoff-s",
        "0",
    ]
    with RewardServer(root, extra_args=args) as server:
        yield server


def test_a_dead_loop_is_a_503_then_a_restart_then_failed_for_good(faulty_server) -> None:
    with (
        faulty_server.http() as http,
        grpc.insecure_channel(faulty_server.grpc_target) as channel,
    ):
        stub = scoring_pb2_grpc.RewardServiceStub(channel)

        r = http.post("/v1/score", json=TWO)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "unavailable"
        assert "'rc-short'" in error["message"] and "1 rewards for 2 items" in error["message"]

        # restarted (limit 1): ready again, and serving what this model can
        eventually(lambda: http.get("/readyz").status_code == 200, "readiness after restart")
        assert http.post("/v1/score", json=ONE).status_code == 200

        # the second death, on gRPC this time, is past the limit
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(pb_request(TWO), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "rc-short" in info.value.details()

        ready = http.get("/readyz")
        assert ready.status_code == 503
        eventually(lambda: grpc_health(channel) == NOT_SERVING, "gRPC health to follow /readyz")
        assert list(ready.json()["failed"]) == ["rc-short"]
        assert "gave up" in ready.json()["failed"]["rc-short"]
        listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert listed["rc-short"]["status"] == "error"
        assert "1 rewards for 2 items" in listed["rc-short"]["error"]
        assert listed["rm-a"]["status"] == "loaded"
        via_grpc = {m.id: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
        assert via_grpc["rc-short"].status == "error"
        assert via_grpc["rc-short"].error == listed["rc-short"]["error"]

        # refused at once, on both transports, while the other model serves
        assert http.post("/v1/score", json=ONE).status_code == 503
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(pb_request(ONE), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert http.post("/v1/score", json={"items": TWO["items"]}).status_code == 200

        # an admin load is the way back
        r = http.post("/v1/admin/models/load", json={"model": "rc-short"})
        assert r.status_code == 200 and r.json()["status"] == "loaded", r.text
        assert http.get("/readyz").status_code == 200
        eventually(lambda: grpc_health(channel) == SERVING, "gRPC health to recover")
        assert http.post("/v1/score", json=ONE).status_code == 200


# ---- a client that disconnects has its queued items dropped -----------------------------------

ITEMS = 4096


@pytest.fixture(scope="module")
def one_row_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RewardServer]:
    """One item per forward, so one large request keeps a long queue."""
    root = tmp_path_factory.mktemp("one-row") / "models"
    build_tiny_rm(root, "rm-a")
    limit = str(ITEMS)
    args = ["--max-batch-size", "1", "--max-queue-items", limit, "--max-items-per-request", limit]
    with RewardServer(root, extra_args=args) as server:
        yield server


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def post_raw(server: RewardServer, body: dict) -> socket.socket:
    """Send a score request and leave the connection open without reading the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection((server.host, server.port))
    head = (
        f"POST /v1/score HTTP/1.1\r\nHost: {server.host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_a_client_that_disconnects_has_its_queued_items_dropped(one_row_server, transport) -> None:
    items = [{"text": f"item {i}: a few words about rivers and stones"} for i in range(ITEMS)]
    body = {"model": "rm-a", "items": items}
    with (
        one_row_server.http() as http,
        grpc.insecure_channel(one_row_server.grpc_target) as channel,
    ):

        def counts() -> tuple[float, float, float]:
            """Items scored, dropped, dropped as cancelled (the server is shared by both
            transports' runs, so the test reads differences)."""
            return (
                metric(http, "rewardserve_items_total", model="rm-a"),
                metric(http, "rewardserve_dropped_items_total", model="rm-a"),
                metric(http, "rewardserve_dropped_items_total", model="rm-a", reason="cancelled"),
            )

        before = counts()
        if transport == "rest":
            sock = post_raw(one_row_server, body)
            leave = sock.close
        else:
            stub = scoring_pb2_grpc.RewardServiceStub(channel)
            call = stub.Score.future(pb_request(body), timeout=120)
            leave = call.cancel
        try:  # one submit queues the whole request at once
            eventually(
                lambda: metric(http, "rewardserve_queue_depth", model="rm-a") > 0,
                "the request to be queued",
            )
        finally:
            leave()

        def delta() -> tuple[float, float, float]:
            return tuple(now - then for now, then in zip(counts(), before, strict=True))

        def settled() -> bool:
            scored, dropped, _ = delta()
            return scored + dropped == ITEMS

        # Every item is accounted for once: scored (those forwarded before the client left)
        # or dropped as cancelled, never scored after its caller had gone.
        eventually(settled, "every item to be scored or dropped")
        scored, dropped, cancelled = delta()
        assert cancelled > 0, f"all {scored:.0f} items were scored"
        assert dropped == cancelled
        assert metric(http, "rewardserve_queue_depth", model="rm-a") == 0
        # and the server serves on
        r = http.post("/v1/score", json={"model": "rm-a", "items": items[:2]})
        assert r.status_code == 200
