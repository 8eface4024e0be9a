"""What loadtests/run.py, benchmarks/overload.py and soak.py share: the service under load
(`rewardserve serve` on the default models, started by the test suite's launcher on free
ports and stopped by its own pid) and the memory of its process tree."""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_bon import load_note, machine  # noqa: E402

from default_models import CACHE, STARTUP_S, default_models_server  # noqa: E402
from servers import RewardServer  # noqa: E402

__all__ = [
    "ROOT",
    "RewardServer",
    "RssSampler",
    "default_models_server",
    "default_server",
    "load_note",
    "machine",
    "tree_rss_mib",
]


def default_server(backend: str, *extra_args: str, torch_threads: int = 2) -> RewardServer:
    """What `make serve` runs (the default models), with extra flags (limits, timeouts).
    On a machine other jobs crowd, one torch thread avoids OpenMP barriers waiting on a
    descheduled sibling thread."""
    if not extra_args and torch_threads == 2:
        return default_models_server(backend)
    return RewardServer(
        ROOT / "models",
        cache_dir=CACHE,
        torch_threads=torch_threads,
        startup_timeout_s=STARTUP_S,
        extra_args=["--policy-backend", backend, *extra_args],
    )


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (vLLM runs an engine process), MiB."""
    total = 0
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
    return total / 2**20


class RssSampler(threading.Thread):
    """The server's RSS (process tree) every `every_s` seconds, with the time of each."""

    def __init__(self, pid: int, every_s: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._done = threading.Event()

    def run(self) -> None:
        import time

        start = time.monotonic()
        while not self._done.is_set():
            self.samples.append((time.monotonic() - start, tree_rss_mib(self.pid)))
            self._done.wait(self.every_s)

    def stop(self) -> list[tuple[float, float]]:
        self._done.set()
        self.join()
        return self.samples
