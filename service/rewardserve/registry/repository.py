"""The model repository on disk: which models exist and whether their manifests are valid."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rewardserve.registry.manifest import MANIFEST_NAME, ManifestError, ModelManifest, load_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    folder: Path
    manifest: ModelManifest | None
    error: str | None = None


def scan_repository(root: Path) -> dict[str, Entry]:
    """Every sub-folder with a model.yaml; a bad manifest is kept as an error, not fatal."""
    entries: dict[str, Entry] = {}
    if not root.is_dir():
        log.warning("model repository %s does not exist", root)
        return entries
    for folder in sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).is_file()):
        try:
            entries[folder.name] = Entry(folder, load_manifest(folder))
        except ManifestError as e:
            log.error("skipping model: %s", e)
            entries[folder.name] = Entry(folder, None, str(e))
    return entries
