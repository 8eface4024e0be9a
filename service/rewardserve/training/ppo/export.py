"""The trained policy as a new policy of the model repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rewardserve.registry.manifest import ModelManifest
from rewardserve.training.publish import WEIGHTS, free_name, publish_model

__all__ = ["WEIGHTS", "export_policy", "free_name"]


def export_policy(
    lm: torch.nn.Module,
    tokenizer: Any,
    root: Path,
    name: str,
    base: ModelManifest,
    description: str,
) -> ModelManifest:
    """Save `lm` (a plain HF causal LM: no value head) and its tokenizer, chat template
    included, into <root>/<name>/weights with a model.yaml beside them that the repository
    reads as a policy. Written under a temporary name and renamed, so the repository never
    sees half an export."""

    def write(folder: Path) -> None:
        lm.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    manifest: dict[str, Any] = {
        "kind": "policy",
        "description": description,
        "max_length": base.max_length,
        "dtype": base.dtype,
    }
    if base.policy is not None:
        manifest["policy"] = base.policy.model_dump(exclude_none=True)
    return publish_model(root, name, write, manifest)
