"""The trained policy as a new policy of the model repository."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from rewardserve.registry.manifest import MANIFEST_NAME, ModelManifest, load_manifest

WEIGHTS = "weights"


def free_name(root: Path, name: str) -> str:
    """`name`, or `name-2`, `name-3`, ... where a folder of that name already exists: an export
    never replaces a model."""
    candidate, i = name, 1
    while (root / candidate).exists():
        i += 1
        candidate = f"{name}-{i}"
    return candidate


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
    tmp = root / f".{name}.export"
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp / WEIGHTS, safe_serialization=True)
    tokenizer.save_pretrained(tmp / WEIGHTS)
    manifest = {
        "name": name,
        "kind": "policy",
        "description": description,
        "source": {"kind": "repository", "path": WEIGHTS},
        "max_length": base.max_length,
        "dtype": base.dtype,
    }
    if base.policy is not None:
        manifest["policy"] = base.policy.model_dump(exclude_none=True)
    (tmp / MANIFEST_NAME).write_text(yaml.safe_dump(manifest, sort_keys=False))
    final = root / name
    tmp.rename(final)
    return load_manifest(final)
