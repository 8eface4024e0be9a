"""Trained models into the model repository: written beside it, then renamed into place, so
the repository (and a service rescanning it) never sees half a model."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from rewardserve.registry.manifest import MANIFEST_NAME, ModelManifest, load_manifest

WEIGHTS = "weights"
"""The sub-folder of a published model that holds its weights (source kind repository)."""


def free_name(root: Path, name: str) -> str:
    """`name`, or `name-2`, `name-3`, ... where a folder of that name already exists: an export
    never replaces a model."""
    candidate, i = name, 1
    while (root / candidate).exists():
        i += 1
        candidate = f"{name}-{i}"
    return candidate


def publish_model(
    root: Path,
    name: str,
    write_weights: Callable[[Path], None],
    manifest: dict[str, Any],
    extra_files: dict[str, str] | None = None,
) -> ModelManifest:
    """<root>/<name>/: `write_weights(folder)` fills <name>/weights, `manifest` (name and
    source are set here) becomes its model.yaml, `extra_files` (file name -> text) lie beside
    it. Built under a temporary name and renamed; raises FileExistsError if <name> exists."""
    final = root / name
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    tmp = root / f".{name}.export"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_weights(tmp / WEIGHTS)
        fields = {"name": name, **manifest, "source": {"kind": "repository", "path": WEIGHTS}}
        (tmp / MANIFEST_NAME).write_text(yaml.safe_dump(fields, sort_keys=False))
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_manifest(final)
