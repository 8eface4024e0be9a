"""Faults: a repository where one model's safetensors is garbage and another's weights folder
is missing, next to a good model. The bad ones are listed as failed with a reason, the good one
serves on both transports, /readyz is 200 (the default model loaded; a model that cannot load
at start-up is left out of readiness unless --models names it), and a repaired model loads
through the admin route without a restart."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from builders import build_tiny_rm
from rewardserve.v1 import scoring_pb2 as pb
from rewardserve.v1 import scoring_pb2_grpc
from servers import RewardServer, pb_request

ITEMS = {"items": [{"text": "a good model still scores"}, {"text": "and so on"}]}


@pytest.fixture(scope="module")
def faulty_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "models"
    build_tiny_rm(root, "good", seed=0, default=True)
    corrupt = build_tiny_rm(root, "corrupt", seed=1)
    for f in (corrupt / "weights").glob("*.safetensors"):
        f.write_bytes(b"\x00garbage, not a safetensors header" * 64)
    shutil.rmtree(build_tiny_rm(root, "missing", seed=2) / "weights")
    return root


@pytest.fixture(scope="module")
def server(faulty_repo: Path) -> Iterator[RewardServer]:
    with RewardServer(faulty_repo) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: RewardServer) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: RewardServer) -> Iterator[scoring_pb2_grpc.RewardServiceStub]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield scoring_pb2_grpc.RewardServiceStub(ch)


def listed(http: httpx.Client) -> dict[str, dict]:
    r = http.get("/v1/models")
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def test_bad_models_are_listed_failed_with_a_reason(http, stub) -> None:
    models = listed(http)
    assert models["good"]["status"] == "loaded"
    assert models["corrupt"]["status"] == "error"
    assert "SafetensorError" in models["corrupt"]["error"]
    assert models["missing"]["status"] == "error"
    assert "weights are not built" in models["missing"]["error"]
    via_grpc = {m.id: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    for name in ("corrupt", "missing"):
        assert (via_grpc[name].status, via_grpc[name].error) == ("error", models[name]["error"])


def test_the_good_model_serves_on_both_transports(http, stub) -> None:
    r = http.post("/v1/score", json=ITEMS)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "good"
    rewards = [x["reward"] for x in r.json()["results"]]
    assert [x.reward for x in stub.Score(pb_request(ITEMS), timeout=10).results] == rewards


def test_readyz_is_200_with_the_failed_models_left_out(http) -> None:
    r = http.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["loaded"] == ["good"]
    assert r.json()["expected"] == ["good"]


@pytest.mark.parametrize("name", ["corrupt", "missing"])
def test_scoring_a_failed_model_is_503_with_its_reason(http, stub, name) -> None:
    r = http.post("/v1/score", json={**ITEMS, "model": name})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "unavailable"
    assert listed(http)[name]["error"] in r.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(pb_request({**ITEMS, "model": name}), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_loading_a_corrupt_model_again_fails_cleanly_and_the_server_lives(server, http) -> None:
    r = http.post("/v1/admin/models/load", json={"model": "corrupt"})
    assert r.status_code == 503, r.text
    assert "SafetensorError" in r.json()["error"]["message"]
    assert listed(http)["corrupt"]["status"] == "error"
    assert server.proc is not None and server.proc.poll() is None
    assert "Traceback" not in server.log_tail(10**7)


def test_a_repaired_model_loads_without_a_restart(faulty_repo, http) -> None:
    good, missing = faulty_repo / "good" / "weights", faulty_repo / "missing" / "weights"
    shutil.copytree(good, missing)
    r = http.post("/v1/admin/models/load", json={"model": "missing"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "loaded" and r.json()["error"] is None
    assert listed(http)["missing"]["status"] == "loaded"
    scored = http.post("/v1/score", json={**ITEMS, "model": "missing"})
    assert scored.status_code == 200, scored.text
    assert http.get("/readyz").status_code == 200
