"""Per-step metrics: one JSON object a line in metrics.jsonl, optionally TensorBoard too."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _finite(v: Any) -> Any:
    # JSON has no NaN/inf: write them as null rather than produce an unreadable line
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsLog:
    def __init__(self, folder: Path, *, resume_step: int | None, tensorboard: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        else:  # the steps after the checkpoint are run again: drop what they wrote
            kept = [
                line
                for line in self._read_lines()
                if json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(kept))
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(log_dir=str(folder / "tensorboard"), purge_step=purge)

    def _read_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return [line for line in self.path.read_text().splitlines(True) if line.strip()]

    def write(self, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _finite(v) for k, v in metrics.items()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = metrics["step"]
            for k, v in metrics.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
