"""Shared fixtures: one repository of tiny models per session, a plain (no-auth) server and
a local Ray head (started on first use, ~15 s, shared by every Ray test of the session)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from ray_head import RayHead
from rewardserve.v1 import scoring_pb2_grpc
from servers import RewardServer, build_model_repo

RAY_HEAD_CPUS = 2
"""What the Ray tests' resource checks are written against (this machine has 2 cores)."""


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once; servers that change their repository get a copy (`repo_copy`)."""
    return build_model_repo(tmp_path_factory.mktemp("shared") / "models")


def repo_copy(model_repo: Path, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    dest = tmp_path_factory.mktemp(name) / "models"
    shutil.copytree(model_repo, dest)
    return dest


@pytest.fixture(scope="session")
def plain_server(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RewardServer]:
    """No API keys, default limits; serves rm-a (default), rm-b and orlhf. Tests that load or
    unload models put things back as they found them."""
    with RewardServer(repo_copy(model_repo, tmp_path_factory, "plain")) as server:
        yield server


@pytest.fixture(scope="session")
def plain_http(plain_server: RewardServer) -> Iterator[httpx.Client]:
    with plain_server.http() as client:
        yield client


@pytest.fixture(scope="session")
def plain_channel(plain_server: RewardServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(plain_server.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="session")
def plain_stub(plain_channel: grpc.Channel) -> scoring_pb2_grpc.RewardServiceStub:
    return scoring_pb2_grpc.RewardServiceStub(plain_channel)


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """Skips where ray is not importable (`make setup` installs the `ray` extra)."""
    pytest.importorskip("ray")
    with RayHead(num_cpus=RAY_HEAD_CPUS) as head:
        yield head
