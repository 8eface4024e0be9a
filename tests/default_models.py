"""The real default models as `make serve` serves them, for tests/e2e and benchmarks."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from rewardserve.config import default_cache_dir
from servers import RewardServer

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("REWARDSERVE_CACHE_DIR") or default_cache_dir())
STARTUP_S = 300.0  # a vLLM engine start on 2 busy cores
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def default_models_server(backend: str) -> RewardServer:
    return RewardServer(
        ROOT / "models",
        cache_dir=CACHE,
        torch_threads=2,
        startup_timeout_s=STARTUP_S,
        extra_args=["--policy-backend", backend],
    )
