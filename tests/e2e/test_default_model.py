"""The real default model as `make serve` runs it: the committed repository, the built cache.

`make test` builds the model first (`make models`), so a missing model is a failure here,
not a skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import httpx
import pytest

from rewardserve.config import default_cache_dir
from rewardserve.training.reward.data import load_pairs, split_pairs
from rewardserve.v1 import scoring_pb2_grpc
from servers import RewardServer, pb_request, pb_response_dict

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("REWARDSERVE_CACHE_DIR") or default_cache_dir())
MODEL = "minilm-hh-harmless"
REPORT = CACHE / MODEL / "training_report.json"
DATA = ROOT.parent / "shared" / "data" / "hh-harmless" / "pairs.jsonl.gz"
N_EVAL = 120  # held-out pairs scored through the service: enough to see ~70 % vs 50 %


@pytest.fixture(scope="module")
def report() -> dict:
    assert REPORT.exists(), f"{REPORT} missing: run `make models` first"
    return json.loads(REPORT.read_text())


@pytest.fixture(scope="module")
def server(report: dict, default_server: RewardServer) -> RewardServer:
    return default_server


@pytest.fixture(scope="module")
def held_out(report: dict):
    cfg = report["config"]
    _, eval_pairs = split_pairs(
        load_pairs(DATA), cfg["eval_fraction"], cfg["seed"], cfg.get("max_pairs")
    )
    return eval_pairs[:N_EVAL]


def test_default_model_is_loaded_and_default(server: RewardServer) -> None:
    models = httpx.get(server.url_for("/v1/models")).json()["data"]
    mine = next(m for m in models if m["id"] == MODEL)
    assert mine["status"] == "loaded" and mine["default"] is True and mine["max_length"] == 256


def test_report_records_what_training_measured(report: dict) -> None:
    assert report["eval_pairs"] > 100
    assert report["reward_std"] > 0.0
    assert report["eval_accuracy"] > 0.6  # chance is 0.5


def test_served_model_prefers_chosen_on_held_out_pairs(
    server: RewardServer, held_out, report
) -> None:
    """The service reproduces the trainer's held-out accuracy: same encoding, same weights."""
    items = [{"text": t} for p in held_out for t in (p.chosen, p.rejected)]
    # The server's 60 s default deadline could pass for 370 texts on two busy cores.
    r = httpx.post(
        server.url_for("/v1/score"),
        json={"items": items},
        headers={"X-Request-Timeout": "300"},
        timeout=300,
    )
    assert r.status_code == 200
    rewards = [x["reward"] for x in r.json()["results"]]
    wins = sum(rewards[2 * i] > rewards[2 * i + 1] for i in range(len(held_out)))
    accuracy = wins / len(held_out)
    assert accuracy > 0.55
    assert abs(accuracy - report["eval_accuracy"]) < 0.12  # a subset of the same split


def test_normalized_rewards_are_centred_by_training_stats(server: RewardServer, report) -> None:
    r = httpx.post(
        server.url_for("/v1/score"),
        json={"items": [{"text": "\n\nHuman: hi\n\nAssistant: Hello!"}]},
    )
    res = r.json()["results"][0]
    expected = (res["reward"] - report["reward_mean"]) / report["reward_std"]
    assert res["normalized_reward"] == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_pair_and_text_forms_agree_and_truncation_keeps_the_end(server: RewardServer) -> None:
    prompt = "\n\nHuman: " + "tell me about the weather " * 100 + "\n\nAssistant:"
    response = "I'd rather not help you hurt anyone."
    body = {"items": [{"prompt": prompt, "response": response}, {"text": prompt + " " + response}]}
    res = httpx.post(server.url_for("/v1/score"), json=body).json()["results"]
    assert res[0]["truncated"] and res[0]["tokens"] == 256
    assert res[0]["reward"] == pytest.approx(res[1]["reward"], abs=1e-5)


def test_grpc_gives_the_same_floats_as_rest(server: RewardServer, held_out) -> None:
    body = {"model": MODEL, "items": [{"text": held_out[0].chosen}, {"text": held_out[0].rejected}]}
    rest = httpx.post(server.url_for("/v1/score"), json=body).json()
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = scoring_pb2_grpc.RewardServiceStub(channel)
        assert pb_response_dict(stub.Score(pb_request(body))) == rest
