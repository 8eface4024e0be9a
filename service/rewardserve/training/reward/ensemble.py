"""`train-rm --ensemble K`: K reward models that differ in their seed (head initialisation
and batch order) on one split, and with `--bootstrap` in their data too (each a bootstrap
resample of the training conversations), in the layout the model repository serves.

<output>/members/<i>/ is each a normal model folder (mean/std in its config.json),
<output>/ensemble.json lists them, and <output>/ensemble.model.yaml is the section a
model.yaml adds (member folders relative to the model's source folder, i.e. <output>).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from rewardserve.training.reward.config import RewardTrainingConfig
from rewardserve.training.reward.data import (
    bootstrap_indices,
    load_pairs,
    pair_groups,
    split_indices,
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

ENSEMBLE_FILE = "ensemble.json"
MANIFEST_SNIPPET = "ensemble.model.yaml"
COMBINE = "normalized"


def manifest_section(members: list[str], combine: str = COMBINE) -> dict[str, Any]:
    """The model.yaml `ensemble` section for member folders relative to the source folder."""
    return {"ensemble": {"members": members, "combine": combine}}


def ensemble_evaluation(
    normalized_margins: torch.Tensor, groups: list[int], seed: int
) -> dict[str, Any]:
    """Held-out results of an ensemble from its members' normalized margins (members x pairs:
    (r_chosen - r_rejected) / std of each member).

    The ensemble's margin is the members' mean (the served reward with combine: normalized);
    a pair's uncertainty is the members' standard deviation of their margins. Pairs are cut
    at the median uncertainty into a more-confident half (the lower floor(n/2)) and the rest:
    if uncertainty means anything, the first half is right more often.
    """
    margins = normalized_margins.mean(dim=0)
    uncertainty = normalized_margins.std(dim=0, correction=0)
    correct = (margins > 0).tolist()
    order = sorted(range(len(correct)), key=lambda i: float(uncertainty[i]))
    half = len(order) // 2
    confident, unsure = order[:half], order[half:]

    def acc(idx: list[int]) -> float | None:
        return sum(correct[i] for i in idx) / len(idx) if idx else None

    return {
        **accuracy_summary(correct, groups, seed=seed),
        "uncertainty": {
            "definition": "std over members (ddof 0) of normalized reward differences",
            "mean": float(uncertainty.mean()),
            "median": float(uncertainty.median()),
            "confident_half": {"pairs": len(confident), "accuracy": acc(confident)},
            "less_confident_half": {"pairs": len(unsure), "accuracy": acc(unsure)},
        },
    }


def train_ensemble(cfg: RewardTrainingConfig, progress: bool = True) -> dict[str, Any]:
    """Train cfg.ensemble members with seeds cfg.seed + i on cfg's split (seeded by cfg.seed
    for every member), write the ensemble layout to cfg.output whole, return the report."""
    started = time.perf_counter()
    output = Path(cfg.output).absolute()
    check_output(output)
    pairs = load_pairs(cfg.data)
    train_idx, held_idx = split_indices(pairs, cfg.eval_fraction, cfg.seed, cfg.max_pairs)
    groups = pair_groups(pairs)
    eval_pairs = [pairs[i] for i in held_idx]
    members: list[dict[str, Any]] = []
    margins: list[torch.Tensor] = []
    with staged_folder(output) as tmp:
        with torch_threads(cfg.torch_threads), make_progress(progress) as bar:
            for m in range(cfg.ensemble):
                seed = cfg.seed + m
                member_idx = (bootstrap_indices(groups, train_idx, seed) if cfg.bootstrap
                              else train_idx)  # fmt: skip
                member_pairs = [pairs[i] for i in member_idx]
                fitted = fit(cfg, member_pairs, eval_pairs, bar, seed=seed,
                             label=f"member {m + 1}/{cfg.ensemble}")  # fmt: skip
                report = finish(cfg, fitted, bar)
                report["member"], report["member_seed"] = m, seed
                margins.append(
                    (fitted.eval_chosen_rewards - fitted.eval_rejected_rewards)
                    / report["reward_std"]
                )
                write_model(tmp / "members" / str(m), fitted, report, started)
                del fitted
                members.append(
                    {
                        "folder": f"members/{m}",
                        "seed": seed,
                        "train_pairs": len(member_pairs),
                        "distinct_train_pairs": len(set(member_idx)),
                        "eval_accuracy": report["eval_accuracy"],
                        "reward_mean": report["reward_mean"],
                        "reward_std": report["reward_std"],
                    }
                )
        folders = [m["folder"] for m in members]
        section = manifest_section(folders)
        report_all: dict[str, Any] = {
            "ensemble": cfg.ensemble,
            "combine": COMBINE,
            "members": members,
            "train_pairs": len(train_idx),
            "eval_pairs": len(eval_pairs),
            "eval_accuracy": None,
            "evaluation": None,
            "manifest": section,
            "config": cfg.model_dump(mode="json"),
        }
        if eval_pairs:
            evaluation = ensemble_evaluation(
                torch.stack(margins), [groups[i] for i in held_idx], cfg.seed
            )
            report_all["evaluation"] = evaluation
            report_all["eval_accuracy"] = evaluation["accuracy"]
        (tmp / ENSEMBLE_FILE).write_text(
            json.dumps({"members": folders, "combine": COMBINE}, indent=2) + "\n"
        )
        (tmp / MANIFEST_SNIPPET).write_text(yaml.safe_dump(section, sort_keys=False))
        report_all["seconds"] = time.perf_counter() - started
        write_report(tmp, report_all)
    return report_all
