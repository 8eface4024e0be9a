"""A job's curves as one PNG: reward, KL, β, an ensemble's uncertainty, losses, entropy and
response length over steps (reward-model jobs: loss, accuracy and learning rate).

Built on a bare Figure with the Agg canvas, never pyplot: pyplot keeps global state that is
not thread-safe, and the route renders in a worker thread.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# (panel title, [(metric key, line label)]): a panel is drawn when any of its keys has a value.
# Keys are the trainers' own: training/ppo/trainer.py train_step and update.py for PPO, the
# reward job's step report (loss, accuracy, lr) and train_reward_model's epoch entries.
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "reward",
        (
            ("objective/scores", "score"),
            ("objective/rlhf_reward", "score − β·KL"),
            ("objective/raw_scores", "raw score"),
            ("objective/reward_objective", "ensemble objective"),
            ("objective/members_mean", "members' mean"),
        ),
    ),
    ("KL to reference", (("objective/kl", "KL"),)),
    ("β (kl_coef)", (("kl_coef", "β"), ("kl_coef_effective", "mean β_i (uncertainty)"))),
    (
        "ensemble uncertainty",
        (
            ("objective/uncertainty", "mean σ"),
            ("objective/uncertainty_penalty", "mean λ·σ"),
        ),
    ),
    (
        "losses",
        (
            ("loss/policy_avg", "policy"),
            ("loss/value_avg", "value"),
            ("loss", "loss"),
            ("train_loss", "train"),
            ("eval_loss", "held-out"),
        ),
    ),
    ("entropy", (("objective/entropy", "entropy"), ("policy/entropy_avg", "update entropy"))),
    ("response length (tokens)", (("response_length", "length"),)),
    (
        "accuracy",
        (
            ("accuracy", "accuracy"),
            ("train_running_accuracy", "train"),
            ("eval_accuracy", "held-out"),
        ),
    ),
    ("learning rate", (("lr", "lr"),)),
)
COLUMNS = 3


def _value(v: Any) -> float:
    """A metric as a float; missing, non-numeric and non-finite ones leave a gap."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return math.nan
    return float(v) if math.isfinite(v) else math.nan


def _steps(metrics: Sequence[dict[str, Any]]) -> list[float]:
    # A record without a step (should not happen) is placed by its position.
    return [_value(m.get("step", i)) for i, m in enumerate(metrics)]


def _present(metrics: Sequence[dict[str, Any]], key: str) -> bool:
    return any(not math.isnan(_value(m.get(key))) for m in metrics)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _empty(message: str) -> bytes:
    fig = Figure(figsize=(5, 2.5), dpi=100)
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, color="0.35")
    return _png(fig)


def plot_png(metrics: Sequence[dict[str, Any]]) -> bytes:
    """The PNG of every known metric present in `metrics` (one dict per step, with `step`).
    No steps yet, or none of the known metrics: a PNG that says so."""
    if not metrics:
        return _empty("no steps yet")
    panels = [
        (title, [(k, label) for k, label in lines if _present(metrics, k)])
        for title, lines in PANELS
    ]
    panels = [(title, lines) for title, lines in panels if lines]
    if not panels:
        return _empty("no plottable metrics")
    cols = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=100)
    steps = _steps(metrics)
    for i, (title, lines) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key, label in lines:
            ax.plot(steps, [_value(m.get(key)) for m in metrics], marker=".", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
