"""The evaluation store: every evaluation of a model as <data_dir>/evals/<model>/<UTC
timestamp>.json with its reliability diagram beside it (.png); the newest is the model's
latest. Timestamps sort as text, so the newest is the last name."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from rewardserve.registry.manifest import NAME_PATTERN
from rewardserve.schemas.evaluation import Evaluation, EvaluationSummary

log = logging.getLogger(__name__)

EVALS_DIR = "evals"
STAMP = "%Y%m%dT%H%M%S.%fZ"
_NAME = re.compile(NAME_PATTERN)


def write_report(e: Evaluation, json_path: Path, png_path: Path | None = None) -> Path:
    """The evaluation as JSON at `json_path` and its diagram at `png_path` (default: beside
    it, .png), each written whole then renamed into place: a reader never sees half a file.
    The PNG's path."""
    from rewardserve.evaluation.plot import reliability_png  # late: matplotlib, only to write

    json_path.parent.mkdir(parents=True, exist_ok=True)
    png_path = png_path or json_path.with_suffix(".png")
    # the diagram first: a JSON in the store always has its PNG beside it
    files = ((png_path, reliability_png(e)), (json_path, e.model_dump_json(indent=2).encode()))
    for path, data in files:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return png_path


class EvaluationStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / EVALS_DIR
        self._cache: dict[Path, tuple[float, Evaluation]] = {}

    def folder(self, model: str) -> Path:
        if not _NAME.fullmatch(model):  # a model name never walks out of the store
            raise ValueError(f"'{model}' is not a model name")
        return self.root / model

    def record(self, e: Evaluation) -> Path:
        """Store `e` as its model's newest evaluation; the JSON's path."""
        path = self.folder(e.model) / (e.evaluated_at.strftime(STAMP) + ".json")
        write_report(e, path)
        return path

    def latest_path(self, model: str) -> Path | None:
        try:
            folder = self.folder(model)
            names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".json"))
        except (ValueError, FileNotFoundError, NotADirectoryError):
            return None
        names = [n for n in names if not n.startswith(".")]
        return folder / names[-1] if names else None

    def latest(self, model: str) -> Evaluation | None:
        """The model's newest evaluation; None if it was never evaluated. Parsed once per
        file (GET /v1/models asks for every model on every call)."""
        path = self.latest_path(model)
        if path is None:
            return None
        mtime = path.stat().st_mtime
        cached = self._cache.get(path)
        if cached is None or cached[0] != mtime:
            try:
                cached = (mtime, Evaluation.model_validate_json(path.read_bytes()))
            except (ValueError, OSError) as e:  # a damaged file: shown as never evaluated
                log.warning("%s: not a readable evaluation: %s", path, e)
                return None
            self._cache[path] = cached
        return cached[1]

    def summary(self, model: str) -> EvaluationSummary | None:
        e = self.latest(model)
        return None if e is None else EvaluationSummary.of(e)
