"""A real `rewardserve serve` subprocess for integration tests (like vLLM's RemoteOpenAIServer).

    with RewardServer(repo, extra_args=["--max-items-per-request", "4"]) as server:
        httpx.post(server.url_for("/v1/score"), json=...)
        grpc.insecure_channel(server.grpc_target)

The server gets free ports for REST and gRPC, a private cache dir, offline Hugging Face
settings and none of the caller's REWARDSERVE_* variables, so a test sees exactly the
configuration it asked for. Start-up waits for /readyz == 200 and gRPC health == SERVING.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

STARTUP_TIMEOUT_S = 90.0
# A vLLM engine's clean shutdown alone may take up to 30 s on busy cores (policy/vllm_backend).
STOP_TIMEOUT_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; we release it at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports (all sockets held open together so they cannot collide)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ServerDied(RuntimeError):
    pass


class RewardServer:
    """`rewardserve serve` in a subprocess; a context manager."""

    def __init__(
        self,
        model_repository: Path | str,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        api_keys: Sequence[str] | None = None,
        cache_dir: Path | str | None = None,
        grpc_enabled: bool = True,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        torch_threads: int = 1,
    ) -> None:
        self.host = "127.0.0.1"
        self.port, self.grpc_port = free_ports(2, self.host)
        self.model_repository = Path(model_repository)
        self._tmp = tempfile.TemporaryDirectory(prefix="rewardserve-test-")
        self.cache_dir = Path(cache_dir) if cache_dir else Path(self._tmp.name) / "cache"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(self._tmp.name) / "server.log"
        self.api_keys = list(api_keys or [])
        self.grpc_enabled = grpc_enabled
        self.startup_timeout_s = startup_timeout_s
        self.args = [
            sys.executable,
            "-m",
            "rewardserve.cli",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--grpc-port",
            str(self.grpc_port),
            "--model-repository",
            str(self.model_repository),
            "--cache-dir",
            str(self.cache_dir),
            "--torch-threads",
            str(torch_threads),
            # Its own jobs database: two test servers never recover each other's jobs.
            "--data-dir",
            str(Path(self._tmp.name) / "data"),
            *([] if grpc_enabled else ["--no-grpc-enabled"]),
            *extra_args,
        ]
        base = {k: v for k, v in os.environ.items() if not k.startswith("REWARDSERVE_")}
        base.update(
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        if self.api_keys:
            base["REWARDSERVE_API_KEYS"] = ";".join(self.api_keys)
        base.update(env or {})
        self.env = base
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    # ---- addresses -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_for(self, *parts: str) -> str:
        return self.base_url + "/" + "/".join(p.strip("/") for p in parts)

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    # ---- lifecycle -------------------------------------------------------------------

    def http(self) -> httpx.Client:
        """A REST client for this server (proxies from the environment ignored)."""
        return httpx.Client(base_url=self.base_url, timeout=30, trust_env=False)

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def launch(self) -> RewardServer:
        """Start the process without waiting (lets several servers import in parallel)."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ServerDied(
                f"rewardserve exited with {self.proc.returncode} before it was ready; "
                f"log tail:\n{self.log_tail()}"
            )

    def wait_ready(self) -> RewardServer:
        if self.proc is None:
            self.launch()
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(trust_env=False, timeout=5) as client:
            while True:
                self._check_alive()
                try:
                    if client.get(self.url_for("readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(
                        f"rewardserve not ready after {self.startup_timeout_s:.0f}s; "
                        f"log tail:\n{self.log_tail()}"
                    )
                time.sleep(0.2)
        if self.grpc_enabled:
            self._wait_grpc_serving(deadline)
        return self

    def _wait_grpc_serving(self, deadline: float) -> None:
        # /readyz turns 200 a moment before the gRPC health status is set to SERVING.
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.grpc_target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive()
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"gRPC health never SERVING; log tail:\n{self.log_tail()}")
                time.sleep(0.1)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S. Returns the exit code."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(STOP_TIMEOUT_S)
            code = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def cleanup(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self._tmp.cleanup()

    def __enter__(self) -> RewardServer:
        try:
            return self.wait_ready()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


# ---- a model repository to serve -----------------------------------------------------------


def sharpen_weights(model_folder: Path, seed: int, std: float = 0.5) -> None:
    """Re-draw a tiny model's weights (LayerNorms kept) with a large std.

    The builders' default init (std 0.02) gives nearly the same reward for every text, so a
    test could not tell a right answer from a wrong one; after this, rewards of different
    texts differ in the first decimal and attending to padding changes them visibly.
    """
    import torch
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    for file in sorted((model_folder / "weights").glob("*.safetensors")):
        tensors = load_file(str(file))
        for key, t in tensors.items():
            if t.is_floating_point() and "LayerNorm" not in key:
                tensors[key] = (torch.randn(t.shape, generator=gen) * std).to(t.dtype)
        save_file(tensors, str(file), metadata={"format": "pt"})


def build_model_repo(root: Path) -> Path:
    """The repository most integration tests serve.

    rm-a: sequence-classification RM, manifest default, reward stats (0.5, 2.0)
    rm-b: another sequence-classification RM, stats (-1.0, 4.0)
    orlhf: OpenRLHF backbone + value head, stats (0.1, 3.0)
    policy-x: a policy manifest (listed, never loaded for scoring)
    broken: a manifest that is not valid YAML (listed with status error)
    """
    from builders import build_tiny_openrlhf_rm, build_tiny_rm, write_manifest

    root.mkdir(parents=True, exist_ok=True)
    sharpen_weights(build_tiny_rm(root, "rm-a", seed=0, default=True, stats=(0.5, 2.0)), 10)
    sharpen_weights(build_tiny_rm(root, "rm-b", seed=1, stats=(-1.0, 4.0)), 11)
    sharpen_weights(build_tiny_openrlhf_rm(root, "orlhf", seed=2), 12)
    write_manifest(
        root / "policy-x",
        name="policy-x",
        kind="policy",
        source={"kind": "cache", "path": "policy-x"},
    )
    (root / "broken").mkdir()
    (root / "broken" / "model.yaml").write_text("name: broken\nkind: [reward\n")
    return root


# ---- the same request on both transports -----------------------------------------------------


def pb_request(body: Mapping[str, object]):
    """A REST /v1/score JSON body as a gRPC ScoreRequest (same model, same items)."""
    from rewardserve.v1 import scoring_pb2 as pb

    items = []
    for it in body["items"]:  # type: ignore[attr-defined]
        if "text" in it:
            items.append(pb.ScoreItem(text=it["text"]))
        elif "messages" in it:
            msgs = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in it["messages"]]
            items.append(pb.ScoreItem(conversation=pb.Conversation(messages=msgs)))
        elif "prompt" in it or "response" in it:
            pair = pb.PromptResponse(prompt=it.get("prompt", ""), response=it.get("response", ""))
            items.append(pb.ScoreItem(pair=pair))
        else:
            items.append(pb.ScoreItem())
        if it.get("label") is not None:
            items[-1].label = it["label"]
    weights = body.get("weights") or {}
    return pb.ScoreRequest(model=body.get("model") or "", items=items, weights=weights)  # type: ignore[arg-type]


def pb_response_dict(resp) -> dict:
    """A gRPC ScoreResponse in the REST JSON shape, for direct comparison."""
    return {
        "model": resp.model,
        "results": [
            {
                "index": r.index,
                "reward": r.reward,
                "normalized_reward": r.normalized_reward,
                "uncertainty": r.uncertainty if r.HasField("uncertainty") else None,
                "members": list(r.members) or None,  # a single model's: none
                "truncated": r.truncated,
                "tokens": r.tokens,
                "parts": dict(r.parts) or None,
            }
            for r in resp.results
        ],
        "usage": {
            "prompt_tokens": resp.usage.prompt_tokens,
            "total_tokens": resp.usage.total_tokens,
        },
    }
