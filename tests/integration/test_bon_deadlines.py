"""Best-of-N deadlines and admission on a real server with a real (tiny) transformers policy.

The tiny policy's tokenizer has no end-of-sequence token, so a candidate always runs to
max_tokens, and it decodes slowly enough (tens of milliseconds a step on two shared cores)
that a request for thousands of tokens cannot finish within a one-second deadline.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from builders import build_tiny_policy
from rewardserve.v1 import bon_pb2 as bpb
from rewardserve.v1 import bon_pb2_grpc
from servers import RewardServer

PROMPT = "\n\nHuman: hi\n\nAssistant:"
SLOW = {"prompt": PROMPT, "n": 4, "max_tokens": 4000}  # minutes of decoding
QUICK = {"prompt": PROMPT, "n": 8, "max_tokens": 2, "return_all": True}
GENEROUS_S = 60  # "promptly": far less than the minutes SLOW would take


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RewardServer]:
    repo = tmp_path_factory.mktemp("bon-deadlines") / "models"
    shutil.copytree(model_repo, repo)
    build_tiny_policy(repo)
    args = [
        *("--bon-max-concurrency", "1", "--bon-max-cost-tokens", "20000"),
        # smaller than one Best-of-N request's candidates: Best-of-N must not hit it
        *("--max-queue-items", "4"),
    ]
    with RewardServer(repo, extra_args=args) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server: RewardServer) -> Iterator[bon_pb2_grpc.BestOfNServiceStub]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield bon_pb2_grpc.BestOfNServiceStub(channel)


def post(server: RewardServer, body: dict, timeout: str | None = None) -> httpx.Response:
    headers = {"X-Request-Timeout": timeout} if timeout else {}
    return httpx.post(
        server.url_for("/v1/best-of-n"), json=body, headers=headers, timeout=300, trust_env=False
    )


def running(server: RewardServer) -> float:
    text = httpx.get(server.url_for("/metrics"), trust_env=False).text
    m = re.search(r"^rewardserve_bon_running (\S+)$", text, re.M)
    assert m, "no rewardserve_bon_running gauge"
    return float(m.group(1))


def wait_running(server: RewardServer, value: float) -> None:
    deadline = time.monotonic() + GENEROUS_S
    while running(server) != value:
        assert time.monotonic() < deadline, f"rewardserve_bon_running never {value}"
        time.sleep(0.05)


def serves_best_of_n(server: RewardServer) -> None:
    """The server answers a Best-of-N request in full (its slot and policy are free)."""
    r = post(server, QUICK)
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert len(res["candidates"]) == 8 and all(c["tokens"] == 2 for c in res["candidates"])


def pb(body: dict) -> bpb.BestOfNRequest:
    fields = {k: v for k, v in body.items() if k != "prompt"}
    return bpb.BestOfNRequest(prompts=[bpb.PromptInput(prompt=body["prompt"])], **fields)


def test_best_of_n_is_not_refused_by_its_own_scorer(server: RewardServer) -> None:
    # 8 candidates scored at once against a 4-item scoring queue
    serves_best_of_n(server)


def test_rest_deadline_is_504_and_the_work_is_dropped(server: RewardServer) -> None:
    started = time.monotonic()
    r = post(server, SLOW, timeout="1")
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < GENEROUS_S
    wait_running(server, 0)
    serves_best_of_n(server)  # concurrency 1: the dropped request's slot is free again


def test_grpc_deadline_is_deadline_exceeded_and_the_work_is_dropped(
    server: RewardServer, stub: bon_pb2_grpc.BestOfNServiceStub
) -> None:
    for call in (stub.BestOfN, lambda req, timeout: list(stub.BestOfNStream(req, timeout=timeout))):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            call(pb(SLOW), timeout=1)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < GENEROUS_S
        wait_running(server, 0)
        serves_best_of_n(server)
    resp = stub.BestOfN(pb(QUICK), timeout=120)
    assert len(resp.results[0].candidates) == 8


def test_cost_cap_is_400_naming_n_with_the_numbers(
    server: RewardServer, stub: bon_pb2_grpc.BestOfNServiceStub
) -> None:
    big = {"prompts": [{"prompt": PROMPT}] * 3, "n": 8, "max_tokens": 1000}
    r = post(server, big)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["field"] == "n" and "24,000" in err["message"] and "20,000" in err["message"]
    req = bpb.BestOfNRequest(prompts=[bpb.PromptInput(prompt=PROMPT)] * 3, n=8, max_tokens=1000)
    with pytest.raises(grpc.RpcError) as info:
        stub.BestOfN(req, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata())["error-field"] == "n"


def test_over_the_concurrency_limit_is_429_at_once_on_both_transports(
    server: RewardServer, stub: bon_pb2_grpc.BestOfNServiceStub
) -> None:
    slow = stub.BestOfN.future(pb(SLOW), timeout=300)
    try:
        wait_running(server, 1)
        r = post(server, QUICK)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
        with pytest.raises(grpc.RpcError) as info:
            stub.BestOfN(pb(QUICK), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(info.value.trailing_metadata())["retry-after"]) >= 1
    finally:
        slow.cancel()  # the client goes away: its generation is dropped
    wait_running(server, 0)
    serves_best_of_n(server)
