"""`rewardserve eval-rm`'s settings (each a flag and a REWARDSERVE_EVAL_ env var)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from rewardserve.config import default_cache_dir
from rewardserve.evaluation.run import DEFAULT_BATCH_ITEMS


class EvalConfig(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    model: str
    """The reward model to evaluate: a name or alias in the model repository."""

    data: Path
    """Preference pairs: a .jsonl or .jsonl.gz file, one {"chosen": ..., "rejected": ...}
    object a line, each a whole HH conversation. Pairs the model trained on give no honest
    accuracy."""

    output: Path | None = None
    """Also write evaluation.json and reliability.png into this folder."""

    max_pairs: int | None = Field(None, ge=1)
    """Evaluate only the file's first N pairs."""

    held_out_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    """Evaluate only the pairs `train-rm --eval-fraction <this> --seed <split-seed>` held
    out of training (whole conversations), so a model is measured on pairs it never saw."""

    split_seed: int = 0
    """The seed of that split (train-rm's --seed)."""

    batch_items: int = Field(DEFAULT_BATCH_ITEMS, ge=2)
    """Conversations per score request (whole pairs: chosen and rejected together)."""

    model_repository: Path = Path("models")
    """The model repository (as `serve --model-repository`)."""

    cache_dir: Path = Field(default_factory=default_cache_dir)
    """Where built model weights live (as `serve --cache-dir`)."""

    data_dir: Path = Path("rewardserve-data")
    """The service's data directory: the evaluation is recorded as the model's latest in
    <data_dir>/evals/<model>/ (as `serve --data-dir`, so GET /v1/models shows it)."""

    torch_threads: int = Field(0, ge=0)
    """Intra-op threads for the forwards (0: one per core)."""
