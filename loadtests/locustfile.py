"""Load test: REST and gRPC users scoring HH texts against a running rewardserve.

    make loadtest        # 32 users for 60 s against 127.0.0.1:8000 / :50051

Bounded by locust's -u/-t flags; targets only the host given (loopback by default).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import time
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import HttpUser, User, between, events, task

from rewardserve.v1 import scoring_pb2 as pb
from rewardserve.v1 import scoring_pb2_grpc as pb_grpc

grpc_gevent.init_gevent()  # locust runs users on gevent; grpc must cooperate with it

DATA = Path(__file__).resolve().parents[2] / "shared/data/hh-harmless/pairs.jsonl.gz"
GRPC_TARGET = os.environ.get("REWARDSERVE_GRPC_TARGET", "127.0.0.1:50051")
AUTH = os.environ.get("REWARDSERVE_API_KEY")


def _texts() -> list[str]:
    with gzip.open(DATA, "rt") as f:
        return [json.loads(line)[side] for line in f for side in ("chosen", "rejected")]


TEXTS = _texts()


class RestUser(HttpUser):
    wait_time = between(0, 0.01)

    @task
    def score(self) -> None:
        headers = {"Authorization": f"Bearer {AUTH}"} if AUTH else {}
        body = {"items": [{"text": random.choice(TEXTS)}]}
        with self.client.post("/v1/score", json=body, headers=headers, catch_response=True) as r:
            if r.status_code == 429:
                r.success()  # admission control doing its job; counted via the metric
            elif r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")


class GrpcUser(User):
    """A gRPC client reporting to locust's request events."""

    wait_time = between(0, 0.01)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(GRPC_TARGET)
        self.stub = pb_grpc.RewardServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {AUTH}"),) if AUTH else ()

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def score(self) -> None:
        request = pb.ScoreRequest(items=[pb.ScoreItem(text=random.choice(TEXTS))])
        start, error = time.perf_counter(), None
        try:
            self.stub.Score(request, metadata=self.metadata, timeout=60)
        except grpc.RpcError as e:
            error = e
        events.request.fire(
            request_type="grpc",
            name="Score",
            response_time=(time.perf_counter() - start) * 1000,
            response_length=0,
            exception=error,
            context={},
        )
