"""Load test: REST and gRPC users on HH texts against a running rewardserve.

    make loadtest        # loadtests/run.py starts the service, runs this, stops it

Traffic is weighted like an RLHF job's: mostly scoring (PPO rollouts), some reranking, a
little Best-of-N with small n and max_tokens. A 429 / RESOURCE_EXHAUSTED is admission
control doing its job: it is reported under its own name ("... [rejected]") so it counts
neither as a failure nor in the endpoint's latencies. Anything else that is not a success
is a failure. Targets only the host given (loopback by default).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import FastHttpUser, User, between, events, task

from rewardserve.v1 import scoring_pb2 as pb
from rewardserve.v1 import scoring_pb2_grpc as pb_grpc

grpc_gevent.init_gevent()  # locust runs users on gevent; grpc must cooperate with it

DATA = Path(
    os.environ.get(
        "REWARDSERVE_LOADTEST_DATA",
        Path(__file__).resolve().parents[2] / "shared/data/hh-harmless/pairs.jsonl.gz",
    )
)
GRPC_TARGET = os.environ.get("REWARDSERVE_GRPC_TARGET", "127.0.0.1:50051")
AUTH = os.environ.get("REWARDSERVE_API_KEY")
REJECTED = " [rejected]"  # suffix of the name a deliberate 429 is reported under
BON_N, BON_MAX_TOKENS = 4, 16


def _pairs() -> list[tuple[str, str]]:
    with gzip.open(DATA, "rt") as f:
        rows = [json.loads(line) for line in f]
    return [(r["chosen"], r["rejected"]) for r in rows]


PAIRS = _pairs()
TEXTS = [t for pair in PAIRS for t in pair]


def _split(text: str) -> tuple[str, str]:
    """An HH text as (prompt up to the last Assistant turn, response)."""
    cut = text.rfind("\n\nAssistant:") + len("\n\nAssistant:")
    return text[:cut], text[cut:].strip() or "ok"


class RestUser(FastHttpUser):
    weight = 3
    wait_time = between(0, 0.05)

    def _post(self, path: str, body: dict, check: Callable[[dict], bool]) -> None:
        headers = {"Authorization": f"Bearer {AUTH}"} if AUTH else {}
        with self.client.post(
            path, json=body, headers=headers, name=path, catch_response=True
        ) as r:
            if r.status_code == 429:
                r.request_meta["name"] = path + REJECTED
                r.success()
            elif r.status_code != 200:
                r.failure(f"{r.status_code}: {(r.text or '')[:200]}")
            elif not check(r.json()):
                r.failure(f"unexpected answer: {(r.text or '')[:200]}")

    @task(12)
    def score(self) -> None:
        k = random.choice((1, 1, 2, 4, 8))
        body = {"items": [{"text": t} for t in random.sample(TEXTS, k)]}
        self._post("/v1/score", body, lambda b: len(b["results"]) == k)

    @task(3)
    def rerank(self) -> None:
        prompt, _ = _split(random.choice(TEXTS))
        candidates = [_split(t)[1] for t in random.sample(TEXTS, 4)]
        body = {"prompt": prompt, "candidates": candidates, "top_k": 2}
        self._post("/v1/rerank", body, lambda b: len(b["results"]) == 2)

    @task(1)
    def best_of_n(self) -> None:
        prompt, _ = _split(random.choice(TEXTS))
        body = {"prompt": prompt, "n": BON_N, "max_tokens": BON_MAX_TOKENS, "temperature": 0.8}
        self._post("/v1/best-of-n", body, lambda b: len(b["results"]) == 1)


class GrpcUser(User):
    """A gRPC client reporting to locust's request events."""

    weight = 1
    wait_time = between(0, 0.05)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(GRPC_TARGET)
        self.stub = pb_grpc.RewardServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {AUTH}"),) if AUTH else ()

    def on_stop(self) -> None:
        self.channel.close()

    def _call(self, name: str, rpc: Callable[[], int], expected: int) -> None:
        start, error = time.perf_counter(), None
        try:
            got = rpc()
            if got != expected:
                error = AssertionError(f"{got} results for {expected} items")
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                name += REJECTED
            else:
                error = e
        events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=0,
            exception=error,
            context={},
        )

    @task(5)
    def score(self) -> None:
        k = random.choice((1, 2, 4))
        request = pb.ScoreRequest(items=[pb.ScoreItem(text=t) for t in random.sample(TEXTS, k)])
        rpc = lambda: len(self.stub.Score(request, metadata=self.metadata, timeout=60).results)  # noqa: E731
        self._call("Score", rpc, k)

    @task(1)
    def score_stream(self) -> None:
        requests = [pb.ScoreRequest(items=[pb.ScoreItem(text=random.choice(TEXTS))])] * 4

        def rpc() -> int:
            stream = self.stub.ScoreStream(iter(requests), metadata=self.metadata, timeout=60)
            return sum(len(r.results) for r in stream)

        self._call("ScoreStream", rpc, 4)
