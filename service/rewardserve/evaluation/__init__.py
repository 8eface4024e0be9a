"""Honest evaluation of a reward model on preference pairs: accuracy with an interval,
calibration, length bias and (for ensembles) whether uncertainty means something.

metrics: the numbers from rewards (pure); texts: what the numbers measure of a
conversation; run: scoring pairs in batches through a score function; report: the
Evaluation from scored pairs; plot: the reliability diagram; store: each model's latest."""
