"""A trained reward model (train_reward_model's output folder) as a new reward model of the
model repository, in the shape of models/minilm-hh-harmless: a sequence-classification head,
left truncation, HH text rather than a chat template, float32. Its reward mean and std are
in the weights' config.json, where train_reward_model put them."""

from __future__ import annotations

import shutil
from pathlib import Path

from rewardserve.registry.manifest import ModelManifest
from rewardserve.training.publish import publish_model


def export_reward_model(
    trained: Path,
    root: Path,
    name: str,
    *,
    max_length: int,
    description: str,
    extra_files: dict[str, str] | None = None,
) -> ModelManifest:
    """Copy `trained` into <root>/<name>/weights beside a model.yaml the repository reads as a
    reward model (written under a temporary name, then renamed). FileExistsError if the name
    is taken."""
    manifest = {
        "kind": "reward",
        "description": description,
        "head": {"format": "sequence_classification"},
        "max_length": max_length,
        # trained on left-truncated HH text (train_reward_model): served the same way
        "truncation_side": "left",
        "chat_template": False,
        "dtype": "float32",
    }
    return publish_model(
        root, name, lambda folder: shutil.copytree(trained, folder), manifest, extra_files
    )
