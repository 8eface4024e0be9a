"""The job plot draws an ensemble's uncertainty series (jobs.plot)."""

from __future__ import annotations

import io

import matplotlib.image

from rewardserve.jobs.plot import plot_png


def _shape(png: bytes) -> tuple[int, int]:
    h, w = matplotlib.image.imread(io.BytesIO(png), format="png").shape[:2]
    return h, w


def test_uncertainty_metrics_get_their_own_panel() -> None:
    steps = [{"step": i, "objective/uncertainty": 0.1 * i} for i in range(1, 4)]
    assert _shape(plot_png(steps)) == (300, 420)  # one panel, 4.2 x 3.0 in at 100 dpi
    assert _shape(plot_png([{"step": 1, "bogus": 1.0}])) == (250, 500)  # "no plottable metrics"
    # with the reward and β panels: three panels in a row
    both = [s | {"objective/scores": 1.0, "kl_coef": 0.1, "kl_coef_effective": 0.2} for s in steps]
    assert _shape(plot_png(both)) == (300, 1260)
