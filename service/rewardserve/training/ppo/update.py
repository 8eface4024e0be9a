"""The optimisation half of a PPO step: epochs of shuffled mini-batches over one batch of
rollouts, with the statistics TRL reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rewardserve.training.ppo import core
from rewardserve.training.ppo.config import PPOConfig
from rewardserve.training.ppo.model import Batch, PolicyWithValueHead, Precision, policy_forward


@dataclass
class Rollouts:
    """One batch of rollouts with what the update needs from before it."""

    batch: Batch
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None
    """GAE's returns (the value targets); None for the critic-free estimators."""


def ppo_update(
    policy: PolicyWithValueHead,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    r: Rollouts,
    c: PPOConfig,
    precision: Precision,
    generator: torch.Generator,
) -> dict[str, Any]:
    """ppo_epochs passes of shuffled mini-batches: clipped surrogate (+ vf_coef x clipped
    value loss when there are returns, - entropy_coef x entropy), gradient clipping, one
    optimiser and scheduler step each. The averaged statistics, and the first mini-batch's
    (taken before any update)."""
    batch, gen = r.batch, generator
    n = batch.input_ids.shape[0]
    stats: dict[str, list[float]] = {
        k: [] for k in ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac",
                        "entropy", "ratio")
    }  # fmt: skip
    policy.train()
    for _ in range(c.ppo_epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, c.mini_batch_size):
            mb = perm[start : start + c.mini_batch_size].to(batch.mask.device)
            sub, mask = batch.rows(mb), batch.mask[mb]
            with precision.autocast():
                logits, new_logp, values = policy_forward(policy, sub, c.temperature)
            pg = core.clipped_policy_loss(
                new_logp, r.old_logprobs[mb], r.advantages[mb], mask, c.cliprange
            )
            loss = pg.loss
            if r.returns is not None:
                vf_loss, vf_clip = core.clipped_value_loss(
                    values, r.old_values[mb], r.returns[mb], mask, c.cliprange_value
                )
                loss = loss + c.vf_coef * vf_loss
                stats["vf_loss"].append(vf_loss.item())
                stats["vf_clipfrac"].append(vf_clip.item())
            entropy = core.masked_mean(core.entropy_from_logits(logits), mask)
            if c.entropy_coef:
                loss = loss - c.entropy_coef * entropy
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), c.max_grad_norm)
            optimizer.step()
            scheduler.step()
            for key, v in (("approxkl", pg.approxkl), ("clipfrac", pg.clipfrac),
                           ("pg_loss", pg.loss), ("entropy", entropy),
                           ("ratio", pg.ratio_mean)):  # fmt: skip
                stats[key].append(v.item())
    policy.eval()

    def avg(key: str) -> float:
        return sum(stats[key]) / len(stats[key]) if stats[key] else 0.0

    return {
        "policy/approxkl_avg": avg("approxkl"),
        "policy/clipfrac_avg": avg("clipfrac"),
        "loss/policy_avg": avg("pg_loss"),
        "loss/value_avg": avg("vf_loss"),
        "val/clipfrac_avg": avg("vf_clipfrac"),
        "policy/entropy_avg": avg("entropy"),
        "val/ratio": avg("ratio"),
        # the first mini-batch of the first epoch runs before any update: with the
        # policy unchanged since the rollout, its ratio is 1 and approxkl/clipfrac 0
        "first_minibatch/approxkl": stats["approxkl"][0],
        "first_minibatch/clipfrac": stats["clipfrac"][0],
        "first_minibatch/ratio": stats["ratio"][0],
    }
