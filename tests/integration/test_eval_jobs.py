"""reward_eval jobs on the real service (tests/servers.RewardServer) with a tiny reward model:
a job scores its pairs through gRPC Score, its evaluation becomes the model's latest, GET
/v1/models (REST) and ListModels (gRPC) show it alike, and bad submissions are refused
naming their field on both transports."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

from builders import build_tiny_rm
from rewardserve.schemas.evaluation import Evaluation
from rewardserve.v1 import jobs_pb2, jobs_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from servers import RewardServer

PAIRS = 10
JOB_TIMEOUT_S = 120.0


def pairs_text(n: int) -> str:
    rows = [
        {
            "chosen": f"\n\nHuman: question {i}?\n\nAssistant: a careful answer to {i}",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: no",
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RewardServer]:
    root = tmp_path_factory.mktemp("eval-jobs")
    build_tiny_rm(root, "tiny-rm", default=True)
    build_tiny_rm(root, "idle-rm", seed=1)  # in the repository, never loaded
    s = RewardServer(root, extra_args=["--models", "tiny-rm"], startup_timeout_s=300)
    data = Path(s.args[s.args.index("--data-dir") + 1])
    data.mkdir(parents=True, exist_ok=True)
    (data / "pairs.jsonl").write_text(pairs_text(PAIRS + 4))
    (data / "broken.jsonl").write_text('{"chosen": "only one side"}\n')
    try:
        yield s.launch().wait_ready()
    finally:
        s.cleanup()


@pytest.fixture(scope="module")
def http(server: RewardServer) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


@pytest.fixture(scope="module")
def channel(server: RewardServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


def rest_models(http: httpx.Client) -> dict[str, dict[str, Any]]:
    r = http.get("/v1/models")
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def grpc_models(channel: grpc.Channel) -> dict[str, Any]:
    stub = scoring_pb2_grpc.RewardServiceStub(channel)
    resp = stub.ListModels(scoring_pb2.ListModelsRequest(), timeout=30)
    return {m.id: m for m in resp.models}


def wait_terminal(http: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} never ended: {job}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def evaluated(http: httpx.Client, channel: grpc.Channel) -> dict[str, Any]:
    """One reward_eval job run to its end, with what /v1/models said before it."""
    before = {"rest": rest_models(http), "grpc": grpc_models(channel)}
    body = {"type": "reward_eval",
            "config": {"model": "tiny-rm", "data": "pairs.jsonl", "max_pairs": PAIRS,
                       "batch_items": 4}}  # fmt: skip
    r = http.post("/v1/jobs", json=body)
    assert r.status_code in (200, 201), r.text
    return {"before": before, "job": wait_terminal(http, r.json()["id"])}


def test_models_show_no_evaluation_before_any(evaluated: dict[str, Any]) -> None:
    rest, pb = evaluated["before"]["rest"], evaluated["before"]["grpc"]
    assert rest["tiny-rm"]["evaluation"] is None and rest["idle-rm"]["evaluation"] is None
    assert not pb["tiny-rm"].HasField("evaluation")


def test_job_scores_every_pair_and_reports_its_evaluation(
    evaluated: dict[str, Any], server: RewardServer
) -> None:
    job = evaluated["job"]
    assert job["status"] == "succeeded", job
    data_dir = Path(server.args[server.args.index("--data-dir") + 1]).resolve()
    assert job["config"]["data"] == str(data_dir / "pairs.jsonl")
    # 2 pairs a request (batch_items 4): one step a Score request
    assert job["total_steps"] == job["step"] == PAIRS // 2
    e = Evaluation.model_validate(job["result"]["evaluation"])
    assert e.model == "tiny-rm" and e.pairs == PAIRS and e.accuracy.n == PAIRS
    assert e.length.chosen_longer.n == PAIRS
    assert e.ensemble is None  # one model: no members
    stored = Path(job["result"]["path"])
    assert stored.is_relative_to(data_dir / "evals" / "tiny-rm")
    assert Evaluation.model_validate_json(stored.read_text()) == e
    assert stored.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_models_show_the_latest_evaluation_on_both_transports(
    evaluated: dict[str, Any], http: httpx.Client, channel: grpc.Channel
) -> None:
    e = Evaluation.model_validate(evaluated["job"]["result"]["evaluation"])
    shown = rest_models(http)["tiny-rm"]["evaluation"]
    assert shown is not None
    assert shown["data"] == "pairs.jsonl" and shown["pairs"] == PAIRS
    assert shown["accuracy"] == e.accuracy.value
    assert (shown["ci_low"], shown["ci_high"]) == (e.accuracy.ci_low, e.accuracy.ci_high)
    assert shown["ece"] == e.calibration.ece
    pb = grpc_models(channel)["tiny-rm"].evaluation
    assert pb.data == shown["data"] and pb.pairs == shown["pairs"]
    # the same values to the last float
    assert (pb.accuracy, pb.ci_low, pb.ci_high, pb.ece) == (
        shown["accuracy"], shown["ci_low"], shown["ci_high"], shown["ece"],
    )  # fmt: skip
    from datetime import datetime

    assert datetime.fromisoformat(pb.evaluated_at) == datetime.fromisoformat(
        shown["evaluated_at"].replace("Z", "+00:00")
    )
    assert rest_models(http)["idle-rm"]["evaluation"] is None


def test_a_held_out_split_job_scores_only_what_training_held_out(
    http: httpx.Client, server: RewardServer
) -> None:
    from rewardserve.training.reward.data import load_pairs, split_pairs

    body = eval_body(held_out_fraction=0.25, split_seed=1, batch_items=4)
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    job = wait_terminal(http, r.json()["id"])
    assert job["status"] == "succeeded", job
    _, held = split_pairs(load_pairs(Path(job["config"]["data"])), 0.25, 1)
    e = Evaluation.model_validate(job["result"]["evaluation"])
    assert e.pairs == len(held) and job["total_steps"] == -(-len(held) // 2)
    assert e.dataset.split is not None and "--eval-fraction 0.25 --seed 1" in e.dataset.split


def eval_body(**config: Any) -> dict[str, Any]:
    base = {"model": "tiny-rm", "data": "pairs.jsonl"}
    return {"type": "reward_eval", "config": {k: v for k, v in (base | config).items() if v}}


REFUSED = [
    ("unknown model", eval_body(model="no-such-rm"), 422, "config.model"),
    ("model not loaded", eval_body(model="idle-rm"), 422, "config.model"),
    ("no model", eval_body(model=None), 422, "config.model"),
    ("missing file", eval_body(data="nope.jsonl"), 422, "config.data"),
    ("outside ..", eval_body(data="../x.jsonl"), 400, "config.data"),
    ("outside /etc", eval_body(data="/etc/passwd"), 400, "config.data"),
    ("bad pairs", eval_body(data="broken.jsonl"), 422, "config.data"),
    ("unknown field", eval_body(temperature=1.0), 422, "config.temperature"),
    ("max_pairs 0", eval_body(max_pairs=-1), 422, "config.max_pairs"),
    ("prompts", {**eval_body(), "prompts": ["hi"]}, 422, "prompts"),
    ("held-out fraction 1", eval_body(held_out_fraction=1.0), 422, "config.held_out_fraction"),
]


@pytest.mark.parametrize(("body", "status", "field"), [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])  # fmt: skip
def test_refused_submissions(
    http: httpx.Client, channel: grpc.Channel, body: dict, status: int, field: str
) -> None:
    before = len(http.get("/v1/jobs").json()["data"])
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field, r.json()
    assert field.split(".")[-1] in r.json()["error"]["message"]
    msg = dict(body)
    if "prompts" in msg:
        msg["prompts"] = [{"prompt": p} for p in msg["prompts"]]
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateJob(json_format.ParseDict(msg, jobs_pb2.CreateJobRequest()), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert dict(info.value.trailing_metadata() or ()).get("error-field") == field
    assert len(http.get("/v1/jobs").json()["data"]) == before
