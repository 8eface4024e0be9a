"""The PPO objective as tensor functions: KL estimators, rewards, advantages, losses, and the
state that carries across steps (reward statistics, the KL coefficient).

No models here, so each formula is testable on hand-made tensors. Shapes: B sequences, T
response tokens; `mask[b, t]` is 1.0 on real response tokens (up to and including EOS) and
0.0 on padding. The definitions follow the RLHF literature (Ziegler et al. 2019, Stiennon et
al. 2020, Schulman's KL approximations, GAE from Schulman et al. 2016, RLOO from Ahmadian et
al. 2024, GRPO from Shao et al. 2024) and the names TRL uses for the same quantities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k3"]


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) under `logits`, in float32 whatever the logits' dtype (bf16 log-softmax
    loses the small differences PPO's ratios are made of)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution."""
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the real positions; padding comes back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy.

    k1 = log p - log q: unbiased, but a single token's value can be negative.
    k3 = (q/p - 1) - log(q/p): also unbiased, never negative, lower variance (Schulman,
    "Approximating KL divergence", 2020). Both average to the same KL over samples.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        # expm1 keeps k3 accurate when the two log-probs are close; the clamp only removes
        # float rounding below zero, the estimator itself is never negative
        return (torch.expm1(-log_ratio) + log_ratio).clamp(min=0.0)
    raise ValueError(f"unknown KL estimator '{estimator}' (k1 | k3)")


def apply_missing_eos_penalty(
    scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None
) -> torch.Tensor:
    """Scores of responses cut at max_new_tokens (no EOS) lowered by `penalty`: the policy
    learns to finish its answers instead of being rewarded for a fragment."""
    if not penalty:
        return scores
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Each row's last real position (0 for an empty row)."""
    return (mask.sum(1).long() - 1).clamp(min=0)


KLCoef = float | torch.Tensor
"""β: one number for the batch, or one per sequence (shape B: the uncertainty controller)."""


def kl_non_score(kl: torch.Tensor, mask: torch.Tensor, kl_coef: KLCoef) -> torch.Tensor:
    """-β·KL at every real token; a per-sequence β multiplies its own row."""
    if isinstance(kl_coef, torch.Tensor):
        kl_coef = kl_coef.to(kl.dtype)[:, None]
    return -kl_coef * kl * mask


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: KLCoef
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of the RLHF objective: -β·KL at every token, plus the reward model's
    score at the last token. Returns (rewards, non_score_rewards)."""
    non_score = kl_non_score(kl, mask, kl_coef)
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index(mask)] += scores.to(rewards.dtype)
    return rewards, non_score


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's response; the state after the last
    real token is terminal (value 0). Returns (advantages, returns = advantages + values)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # padding positions carry nothing back: the episode ended before them
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def _groups(seq_rewards: torch.Tensor, k: int) -> torch.Tensor:
    if k < 2 or seq_rewards.shape[0] % k:
        raise ValueError(f"{seq_rewards.shape[0]} rewards cannot form groups of k={k} (k >= 2)")
    return seq_rewards.view(-1, k)


def rloo_advantages(seq_rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out: each sample's baseline is the mean reward of the other k-1
    samples of its prompt. Rows are grouped prompt-major (row i*k + j)."""
    g = _groups(seq_rewards, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def grpo_advantages(seq_rewards: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages: rewards standardised within each prompt's k samples."""
    g = _groups(seq_rewards, k)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).reshape(-1)


@dataclass
class PolicyLossStats:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approxkl: torch.Tensor
    ratio_mean: torch.Tensor


def clipped_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> PolicyLossStats:
    """PPO's clipped surrogate, averaged over real tokens. approxkl is 0.5·E[(log r)^2], the
    estimate TRL reports as policy/approxkl_avg."""
    log_ratio = (new_logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossStats(loss, clipfrac, approxkl, ratio_mean)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5·max((v - R)^2, (clip(v, v_old ± ε_v) - R)^2) over real tokens; (loss, clipfrac)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_err > unclipped_err).float(), mask)
    return loss, clipfrac


class RunningMoments:
    """Running mean and std of every reward seen so far (Chan et al.'s parallel update), so
    rewards are normalised by statistics that do not jump with each batch."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    @property
    def std(self) -> float:
        return max(self.var, 0.0) ** 0.5

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = x.mean().item(), x.var(unbiased=False).item()
        if self.count == 0:
            self.mean, self.var, self.count = batch_mean, batch_var, n
            return
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + 1e-8)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], int(state["count"])


class FixedKLController:
    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon),
    with n_steps the episodes in the batch: β rises while KL is above target, falls below."""

    def __init__(self, kl_coef: float, target_kl: float, horizon: int) -> None:
        super().__init__(kl_coef)
        self.target, self.horizon = target_kl, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def uncertainty_penalty(
    scores: torch.Tensor, uncertainty: torch.Tensor | None, lam: float
) -> torch.Tensor:
    """r − λ·σ (Zhai et al. 2023, uncertainty-penalized RLHF): a sample the ensemble's members
    disagree on is worth less. λ = 0 or no uncertainty: the scores unchanged."""
    if not lam or uncertainty is None:
        return scores
    return scores - lam * uncertainty.to(scores.dtype)


def uncertainty_kl_coefs(
    beta: float, uncertainty: torch.Tensor, scale: float, ref: float | None
) -> torch.Tensor:
    """β_i = β·(1 + scale·σ_i/σ_ref) for each sequence; σ_ref = `ref`, or the batch's mean σ
    when `ref` is None (a batch with no uncertainty at all: every β_i = β).

    Linear in σ rather than exponential: exact at σ = 0, monotone, and it grows no faster
    than the uncertainty itself, so one sample the members wildly disagree on gets a strong
    pull to the reference without its KL term swamping every other sample's advantage (an
    exponential factor would). The penalty β_i·KL is then β·KL + β·scale·(σ_i/σ_ref)·KL: the
    base objective plus an uncertainty-weighted KL regulariser, in the spirit of variance-
    aware policy regularisation (Banerjee et al. 2025, "Towards Reliable, Uncertainty-Aware
    Alignment")."""
    sigma = uncertainty.float()
    sigma_ref = sigma.mean().item() if ref is None else ref
    ratio = sigma / sigma_ref if sigma_ref > 0 else torch.zeros_like(sigma)
    return torch.full_like(sigma, beta) * (1.0 + scale * ratio)


class UncertaintyKLController:
    """β_i per sample from the ensemble's uncertainty (uncertainty_kl_coefs); the base β is
    the `base` controller's (fixed or adaptive), which it updates as it always does, so with
    σ = 0 everywhere this is exactly the base controller."""

    def __init__(self, base: FixedKLController, scale: float, ref: float | None) -> None:
        self.base, self.scale, self.ref = base, scale, ref

    @property
    def value(self) -> float:
        return self.base.value

    def coefs(self, uncertainty: torch.Tensor) -> torch.Tensor:
        return uncertainty_kl_coefs(self.base.value, uncertainty, self.scale, self.ref)

    def update(self, current_kl: float, n_steps: int) -> None:
        self.base.update(current_kl, n_steps)

    def state_dict(self) -> dict[str, float]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.base.load_state_dict(state)


KLController = FixedKLController | UncertaintyKLController


def make_kl_controller(
    kind: Literal["fixed", "adaptive", "uncertainty"],
    kl_coef: float,
    target_kl: float,
    horizon: int,
    *,
    base: Literal["fixed", "adaptive"] = "fixed",
    scale: float = 1.0,
    ref: float | None = 1.0,
) -> KLController:
    """`base`, `scale`, `ref`: the uncertainty controller's (uncertainty_kl_base, _scale,
    _ref)."""
    if kind == "uncertainty":
        return UncertaintyKLController(
            make_kl_controller(base, kl_coef, target_kl, horizon),  # type: ignore[arg-type]
            scale,
            ref,
        )
    if kind == "adaptive":
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    return FixedKLController(kl_coef)
