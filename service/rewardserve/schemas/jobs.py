"""Training jobs: what a client submits, what it reads back, and what a worker reports.

The job's `config` is validated by the trainer's own config class (PPOConfig for `ppo`,
jobs.specs.RewardJobConfig for `reward`, jobs.specs.EvalJobConfig for `reward_eval`) at
submission; these schemas only carry it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from rewardserve.schemas.bon import PromptInput

JobType = Literal["ppo", "reward", "reward_eval"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
EventType = Literal["status", "step", "checkpoint", "log"]


class Resources(BaseModel):
    """What one attempt of the job needs. The Ray runner passes these as the entrypoint's
    resources; the local runner refuses what this machine cannot give."""

    model_config = ConfigDict(extra="forbid")
    cpus: float | None = Field(None, gt=0, le=1024)
    """CPU cores; the worker's torch threads are this rounded up. None: --job-torch-threads.
    The local runner refuses more than this machine has."""
    gpus: float = Field(0.0, ge=0, le=64)
    """GPUs (local runner: refused unless this machine has that many CUDA devices)."""
    memory_gib: float | None = Field(None, gt=0, le=4096)
    """Memory the worker may use (Ray: entrypoint_memory). None: no reservation."""


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: JobType
    """ppo: the PPO trainer (`rewardserve ppo`); reward: the Bradley-Terry trainer
    (`rewardserve train-rm`), whose model is registered and loaded when it succeeds;
    reward_eval: `rewardserve eval-rm` on a loaded reward model, its evaluation recorded as
    the model's latest (GET /v1/models)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The trainer's config fields (PPOConfig, RewardJobConfig for reward jobs, EvalJobConfig
    for reward_eval jobs)."""
    prompts: list[StrictStr | PromptInput] | None = Field(None, min_length=1)
    """ppo: training prompts inline (instead of prompts_file)."""
    prompts_file: StrictStr | None = Field(None, min_length=1)
    """ppo: a JSON-lines prompts file inside the service's data directory (relative to it)."""
    resources: Resources = Field(default_factory=Resources)
    idempotency_key: StrictStr | None = Field(None, min_length=1, max_length=200)
    """Submitting again with the same key returns the first job instead of starting a
    second (the same body is required: another body under a used key is a 409)."""


class Checkpoint(BaseModel):
    step: int
    path: str


class Job(BaseModel):
    id: str
    type: JobType
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    """When its first attempt started running."""
    ended_at: datetime | None = None
    config: dict[str, Any]
    """The config as validated, defaults filled in."""
    resources: Resources
    step: int = 0
    total_steps: int
    attempt: int = 0
    """Attempts started so far (a restart after a dead worker or a resume adds one)."""
    restarts: int = 0
    """Restarts after a dead worker within the current run (bounded by --job-max-restarts)."""
    metrics: dict[str, Any] | None = None
    """The latest step's metrics."""
    checkpoints: list[Checkpoint] = Field(default_factory=list)
    result: dict[str, Any] | None = None
    """Succeeded ppo: `policy` names the registered policy; reward: `model` the reward model;
    reward_eval: `model`, `evaluation` (the report) and `path` (where it is stored)."""
    error: str | None = None
    idempotency_key: str | None = None


class JobList(BaseModel):
    data: list[Job]
    next_page_token: str | None = None
    """Pass as page_token for the next page; None on the last page."""


class JobEvent(BaseModel):
    """One server-sent event (SSE `id:` is `id`, `event:` is `type`, `data:` the JSON of
    this object)."""

    id: int
    """Increasing over the job's events; a reconnecting client sends it as Last-Event-ID."""
    job_id: str
    type: EventType
    created_at: datetime
    data: dict[str, Any]
    """status: {status, error?, result?}; step: {step, metrics, samples: [{prompt, response,
    reward}]}; checkpoint: {step, path}; log: {message}."""


class Sample(BaseModel):
    prompt: str
    response: str
    reward: float | None = None


class WorkerReport(BaseModel):
    """What a worker tells the service about its job (POST /v1/jobs/{id}/report). A report
    from an attempt that is no longer the job's current one is refused (409): the worker
    then exits."""

    model_config = ConfigDict(extra="forbid")
    attempt: int = Field(ge=1)
    kind: Literal["started", "step", "checkpoint", "succeeded", "failed", "log"]
    step: int | None = Field(None, ge=0)
    total_steps: int | None = Field(None, ge=1)
    metrics: dict[str, Any] | None = None
    samples: list[Sample] = Field(default_factory=list, max_length=16)
    checkpoint: str | None = None
    """checkpoint: the checkpoint folder."""
    result: dict[str, Any] | None = None
    """succeeded: the trainer's result (ppo: export_name, eval...; reward: the report)."""
    error: str | None = Field(None, max_length=20_000)
    message: str | None = Field(None, max_length=20_000)
