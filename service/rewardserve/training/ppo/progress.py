"""The progress bar of a PPO run: step, reward, KL, β and seconds per step."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class StepProgress:
    def __init__(self, total: int, done: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("ppo"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self._task = self._progress.add_task("ppo", total=total, completed=done, info="")

    def __enter__(self) -> StepProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.__exit__(kind, value, tb)

    def update(self, m: dict[str, Any]) -> None:
        info = (
            f"reward {m['objective/raw_scores']:+.3f}  KL {m['objective/kl']:.3f}  "
            f"β {m['kl_coef']:.4f}  {m['time/step_s']:.2f} s/step"
        )
        self._progress.update(self._task, completed=m["step"], info=info)
