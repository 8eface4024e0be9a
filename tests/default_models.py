"""The real default models as `make serve` serves them, for tests/e2e and benchmarks."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from rewardserve.config import default_cache_dir
from servers import RewardServer

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("REWARDSERVE_CACHE_DIR") or default_cache_dir())
STARTUP_S = 300.0  # a vLLM engine start on 2 busy cores
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


POLICY = "smollm2-135m-instruct"


def repository_copy(*, float32_policy: bool = False) -> tempfile.TemporaryDirectory:
    """A private copy of models/ (at `<tmp>/models`): a server that writes into its repository
    (a PPO job's exported policy) leaves the checkout as it was. `float32_policy`: see
    float32_policy_repository."""
    tmp = tempfile.TemporaryDirectory(prefix="rewardserve-models-")
    repo = Path(tmp.name) / "models"
    shutil.copytree(ROOT / "models", repo)
    if float32_policy:
        manifest = repo / POLICY / "model.yaml"
        raw = yaml.safe_load(manifest.read_text())
        manifest.write_text(yaml.safe_dump(raw | {"dtype": "float32"}, sort_keys=False))
    return tmp


def float32_policy_repository() -> tempfile.TemporaryDirectory:
    """A copy of models/ whose default policy pins float32. `dtype: auto` is bf16 on CPUs
    with AMX, where vLLM's samples for a seed moved between two identical requests (its bf16
    numerics depend on what shares a step); tests that assert same seed, same candidates
    need the float32 engine, which was reproducible."""
    return repository_copy(float32_policy=True)


def default_models_server(
    backend: str,
    *,
    reproducible: bool = False,
    private_repository: bool = False,
    extra_args: Sequence[str] = (),
) -> RewardServer:
    """The default models as `make serve` serves them; `reproducible`: the policy in float32
    whatever the CPU (see float32_policy_repository); `private_repository`: a copy of models/
    as it is (for servers that write into their repository)."""
    copy = reproducible or private_repository
    repo_dir = repository_copy(float32_policy=reproducible) if copy else None
    server = RewardServer(
        Path(repo_dir.name) / "models" if repo_dir else ROOT / "models",
        cache_dir=CACHE,
        torch_threads=2,
        startup_timeout_s=STARTUP_S,
        extra_args=["--policy-backend", backend, *extra_args],
    )
    server.repository_copy = repo_dir  # type: ignore[attr-defined]  # lives as long as the server
    return server
