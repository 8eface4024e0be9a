"""Grouped k-fold cross-validation of a reward-model recipe, and the served model after it.

Every pair is scored once by a model that never saw its conversation, so the pooled
out-of-fold accuracy is an estimate for conversations the final model (trained on all of
them) has not seen either; its interval comes from a cluster bootstrap over the groups.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.progress import Progress

from rewardserve.training.reward.config import RewardTrainingConfig
from rewardserve.training.reward.data import (
    PreferencePair,
    capped_indices,
    grouped_folds,
    load_pairs,
    pair_groups,
)
from rewardserve.training.reward.stats import accuracy_summary
from rewardserve.training.reward.trainer import (
    check_output,
    finish,
    fit,
    make_progress,
    staged_folder,
    torch_threads,
    write_model,
    write_report,
)

log = logging.getLogger(__name__)


def cross_validate(
    cfg: RewardTrainingConfig,
    pairs: Sequence[PreferencePair],
    indices: Sequence[int],
    groups: Sequence[int],
    folds: int,
    bar: Progress,
    *,
    fold_seed: int | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Train `folds` models on grouped folds of `pairs[indices]` (cfg's recipe; the folds
    seeded by `fold_seed`, default cfg.seed, so that recipes compared on one seed share
    their folds) and pool their out-of-fold outcomes.

    Returns {"folds", "accuracy", "interval", "pairs", "groups", "method", "per_fold",
    "out_of_fold"}: per_fold gives each fold's accuracy, sizes and seconds; out_of_fold
    lists, for every pair used, its index into `pairs`, its fold and the margin
    r_chosen - r_rejected of the model that did not train on it.
    """
    fold_seed = cfg.seed if fold_seed is None else fold_seed
    fold_lists = grouped_folds(groups, indices, folds, fold_seed)
    prefix = f"{label} " if label else ""
    task = bar.add_task(f"{prefix}cross-validation", total=folds, stats="")
    out_of_fold: list[dict[str, Any]] = []
    per_fold: list[dict[str, Any]] = []
    for f, held in enumerate(fold_lists):
        train = [i for g, other in enumerate(fold_lists) if g != f for i in other]
        fold_started = time.perf_counter()
        fitted = fit(
            cfg,
            [pairs[i] for i in train],
            [pairs[i] for i in held],
            bar,
            label=f"{prefix}fold {f + 1}/{folds}",
        )
        margins = (fitted.eval_chosen_rewards - fitted.eval_rejected_rewards).tolist()
        del fitted  # one model in memory at a time
        out_of_fold.extend(
            {"index": i, "fold": f, "margin": m} for i, m in zip(held, margins, strict=True)
        )
        accuracy = sum(m > 0 for m in margins) / len(margins)
        per_fold.append(
            {
                "fold": f,
                "pairs": len(held),
                "groups": len({groups[i] for i in held}),
                "train_pairs": len(train),
                "accuracy": accuracy,
                "seconds": time.perf_counter() - fold_started,  # training and scoring
            }
        )
        log.info("%sfold %d/%d: accuracy %.4f on %d pairs", prefix, f + 1, folds, accuracy,
                 len(held))  # fmt: skip
        bar.update(task, advance=1, stats=f"fold {f + 1} acc {accuracy:.3f}")
    bar.remove_task(task)
    correct = [o["margin"] > 0 for o in out_of_fold]
    summary = accuracy_summary(correct, [groups[o["index"]] for o in out_of_fold], seed=fold_seed)
    return {"folds": folds, **summary, "per_fold": per_fold, "out_of_fold": out_of_fold}


def train_cross_validated(cfg: RewardTrainingConfig, progress: bool = True) -> dict[str, Any]:
    """`train-rm --cv K`: cross-validate cfg's recipe over the pairs it uses (all, or
    max_pairs of them) and, with cfg.cv_final, train the served model on all of them.

    The report (training_report.json in cfg.output, also returned) has a "cv" section and
    "accuracy_estimate", the cross-validated accuracy: the final model has no held-out split,
    so this is its honest accuracy. Without cv_final the folder holds only the report.
    """
    assert cfg.cv_folds is not None
    started = time.perf_counter()
    output = Path(cfg.output).absolute()
    check_output(output)
    pairs = load_pairs(cfg.data)
    used = capped_indices(len(pairs), cfg.seed, cfg.max_pairs)
    groups = pair_groups(pairs)
    with torch_threads(cfg.torch_threads), make_progress(progress) as bar:
        cv = cross_validate(cfg, pairs, used, groups, cfg.cv_folds, bar)
        cv["seconds"] = time.perf_counter() - started
        estimate = {k: cv[k] for k in ("accuracy", "interval", "pairs", "groups", "method")}
        estimate["source"] = f"grouped {cfg.cv_folds}-fold cross-validation (out-of-fold)"
        if not cfg.cv_final:
            report = {"cv": cv, "accuracy_estimate": estimate,
                      "config": cfg.model_dump(mode="json")}  # fmt: skip
            with staged_folder(output) as folder:
                write_report(folder, report)
            return report
        final_cfg = cfg.model_copy(update={"eval_fraction": 0.0})
        fitted = fit(final_cfg, [pairs[i] for i in used], [], bar, label="final")
        report = finish(cfg, fitted, bar)
    report["cv"] = cv
    report["accuracy_estimate"] = estimate
    write_model(output, fitted, report, started)
    log.info("cross-validated accuracy %.4f %s; final model in %s", cv["accuracy"],
             cv["interval"], output)  # fmt: skip
    return report
