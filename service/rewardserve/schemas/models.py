"""Model listing and admin load/unload."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictStr

from rewardserve.schemas.evaluation import EvaluationSummary


class ModelInfo(BaseModel):
    id: str
    aliases: list[str] = []
    """Other names requests may use for this model (its manifest's `aliases`)."""
    object: Literal["model"] = "model"
    kind: Literal["reward", "policy"]
    status: Literal["loaded", "available", "error"]
    """loaded: serving. available: in the repository, not loaded. error: cannot serve, with
    the reason in `error` (a bad manifest, a policy whose engine died, or a loaded reward
    model whose batcher loop failed: 503 for its requests while it restarts or for good)."""
    default: bool = False
    max_length: int
    description: str = ""
    error: str | None = None
    evaluation: EvaluationSummary | None = None
    """Reward models: the latest evaluation (`rewardserve eval-rm` or a reward_eval job) on
    preference pairs; None when never evaluated."""
    members: int | None = None
    """Ensembles: how many members score each item; null for a single model."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr
    """A model's name or one of its aliases."""
