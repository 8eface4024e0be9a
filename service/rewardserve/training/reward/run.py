"""One entry point for a reward-model training run, whatever its mode."""

from __future__ import annotations

from typing import Any

from rewardserve.training.reward.config import RewardTrainingConfig
from rewardserve.training.reward.cv import train_cross_validated
from rewardserve.training.reward.ensemble import train_ensemble
from rewardserve.training.reward.trainer import RewardStepHook, train_reward_model


def run_reward_training(
    cfg: RewardTrainingConfig, progress: bool = True, on_step: RewardStepHook | None = None
) -> dict[str, Any]:
    """Cross-validation (cfg.cv_folds), an ensemble (cfg.ensemble > 1) or one model.
    `on_step` is only called for one model (the jobs API counts that run's steps)."""
    if cfg.cv_folds is not None:
        return train_cross_validated(cfg, progress)
    if cfg.ensemble > 1:
        return train_ensemble(cfg, progress)
    return train_reward_model(cfg, progress, on_step)
