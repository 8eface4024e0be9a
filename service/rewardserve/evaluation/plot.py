"""The reliability diagram of an evaluation as a PNG: per bin, the observed share of
"chosen wins" against the mean predicted p, beside the diagonal of perfect calibration,
and the bins' counts below.

A bare Figure on the Agg canvas, never pyplot (global state, not thread-safe: the service
renders in a worker thread)."""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rewardserve.schemas.evaluation import Evaluation


def reliability_png(e: Evaluation) -> bytes:
    bins = e.calibration.bins
    fig = Figure(figsize=(5.5, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = bins[0].upper - bins[0].lower
    centres = [(b.lower + b.upper) / 2 for b in bins]
    filled = [b for b in bins if b.count]
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
    top.bar([(b.lower + b.upper) / 2 for b in filled], [b.observed or 0.0 for b in filled],
            width=width * 0.9, alpha=0.35, color="tab:blue", label="observed")  # fmt: skip
    top.plot([b.mean_predicted for b in filled], [b.observed for b in filled], marker="o",
             color="tab:blue", label="mean predicted vs observed")  # fmt: skip
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel('observed share "chosen wins"')
    acc = e.accuracy
    top.set_title(
        f"{e.model} on {e.dataset.name} ({e.pairs} pairs)\n"
        f"accuracy {acc.value:.3f} [{acc.ci_low:.3f}, {acc.ci_high:.3f}], "
        f"ECE {e.calibration.ece:.3f}",
        fontsize=9,
    )
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [b.count for b in bins], width=width * 0.9, color="tab:grey")
    bottom.set_xlabel("predicted p = σ(r_chosen − r_rejected), both sides of each pair")
    bottom.set_ylabel("count")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
