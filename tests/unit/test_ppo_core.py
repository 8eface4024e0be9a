"""The PPO objective's formulas on hand-made tensors (rewardserve.training.ppo.core)."""

from __future__ import annotations

import math

import pytest
import torch

from rewardserve.training.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    UncertaintyKLController,
    apply_missing_eos_penalty,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    grpo_advantages,
    kl_penalty,
    logprobs_from_logits,
    make_kl_controller,
    masked_mean,
    masked_whiten,
    rloo_advantages,
    token_rewards,
    uncertainty_kl_coefs,
    uncertainty_penalty,
)

# Two responses: 4 real tokens, and 2 real tokens then padding.
MASK = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])


def rewards_values() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, generator=g) * MASK, torch.randn(2, 4, generator=g) * MASK


def test_gae_with_gamma_lambda_one_and_zero_values_is_the_reward_to_go() -> None:
    rewards, _ = rewards_values()
    adv, returns = gae(rewards, torch.zeros(2, 4), MASK, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1) * MASK
    torch.testing.assert_close(adv, to_go)
    torch.testing.assert_close(returns, to_go)


def test_gae_with_lambda_zero_is_the_one_step_td_error() -> None:
    rewards, values = rewards_values()
    gamma = 0.9
    adv, returns = gae(rewards, values, MASK, gamma=gamma, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(2, 1)], 1) * torch.cat(
        [MASK[:, 1:], torch.zeros(2, 1)], 1
    )  # the state after the last real token is terminal
    td = (rewards + gamma * next_values - values) * MASK
    torch.testing.assert_close(adv, td)
    torch.testing.assert_close(returns, (td + values) * MASK)


def test_gae_is_the_discounted_sum_of_td_errors() -> None:
    rewards, values = rewards_values()
    gamma, lam = 0.95, 0.8
    adv, _ = gae(rewards, values, MASK, gamma, lam)
    one_step, _ = gae(rewards, values, MASK, gamma, 0.0)
    for b, n in ((0, 4), (1, 2)):
        for t in range(n):
            expected = sum((gamma * lam) ** (j - t) * one_step[b, j] for j in range(t, n))
            assert adv[b, t].item() == pytest.approx(float(expected), abs=1e-6)
    assert adv[1, 2:].abs().sum() == 0  # padding gets no advantage


def test_the_score_lands_on_the_last_real_token_and_kl_on_every_token() -> None:
    kl = torch.full((2, 4), 0.5) * MASK
    rewards, non_score = token_rewards(torch.tensor([3.0, -1.0]), kl, MASK, kl_coef=0.1)
    torch.testing.assert_close(non_score, -0.05 * MASK)
    expected = -0.05 * MASK
    expected[0, 3] += 3.0
    expected[1, 1] += -1.0
    torch.testing.assert_close(rewards, expected)


def test_a_response_without_eos_loses_exactly_the_penalty() -> None:
    scores = torch.tensor([1.0, 2.0, -0.5])
    has_eos = torch.tensor([True, False, False])
    out = apply_missing_eos_penalty(scores, has_eos, 1.5)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, -2.0]))
    torch.testing.assert_close(apply_missing_eos_penalty(scores, has_eos, None), scores)


def test_adaptive_kl_follows_zieglers_update_on_a_worked_example() -> None:
    ctl = AdaptiveKLController(kl_coef=0.2, target_kl=6.0, horizon=10_000)
    # KL 9 is 50 % over target: the error clips to +0.2; 512 episodes of a 10,000 horizon.
    ctl.update(current_kl=9.0, n_steps=512)
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 512 / 10_000))
    # KL 5.4 is 10 % under: the error is -0.1, unclipped.
    before = ctl.value
    ctl.update(current_kl=5.4, n_steps=256)
    assert ctl.value == pytest.approx(before * (1 - 0.1 * 256 / 10_000))
    restored = make_kl_controller("adaptive", 1.0, 6.0, 10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_a_fixed_kl_coefficient_never_moves() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    assert ctl.value == 0.05
    assert isinstance(make_kl_controller("fixed", 0.05, 6.0, 10_000), FixedKLController)


def test_rloo_baseline_for_a_sample_excludes_that_sample() -> None:
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # 2 prompts x 3 samples
    adv = rloo_advantages(rewards, k=3)
    for i in range(6):
        group = rewards[(i // 3) * 3 : (i // 3) * 3 + 3].tolist()
        others = group[: i % 3] + group[i % 3 + 1 :]
        assert adv[i].item() == pytest.approx(rewards[i].item() - sum(others) / 2)
    # moving one sample's reward leaves its own baseline unchanged
    moved = rewards.clone()
    moved[0] += 10.0
    assert rloo_advantages(moved, 3)[0] - adv[0] == pytest.approx(10.0)


def test_grpo_advantages_have_zero_mean_and_unit_std_per_group() -> None:
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.5, -4.0, 3.0, 7.0, 7.5])  # 2 prompts x 4
    adv = grpo_advantages(rewards, k=4).view(2, 4)
    torch.testing.assert_close(adv.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(1), torch.ones(2), atol=1e-3, rtol=0)
    # a group whose samples all score alike gets no advantage, not a division by zero
    assert grpo_advantages(torch.ones(4), k=4).abs().max() == 0


def test_groups_need_k_of_at_least_two_that_divides_the_batch() -> None:
    with pytest.raises(ValueError):
        rloo_advantages(torch.ones(6), k=4)
    with pytest.raises(ValueError):
        grpo_advantages(torch.ones(3), k=1)


def test_k1_and_k3_agree_in_expectation_and_k3_is_never_negative() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    exact = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 400_000, replacement=True, generator=g)
    logp, logq = p.log()[samples], q.log()[samples]
    k1, k3 = kl_penalty(logp, logq, "k1"), kl_penalty(logp, logq, "k3")
    assert k1.mean().item() == pytest.approx(exact, rel=0.02)
    assert k3.mean().item() == pytest.approx(exact, rel=0.02)
    assert (k1 < 0).any()  # single k1 terms can be negative ...
    assert (k3 >= 0).all()  # ... k3 terms never are
    # ... not even for nearly equal log-probs, where a naive exp(x) - 1 - x rounds below 0
    tiny = torch.tensor([1e-9, -1e-9, 3e-8])
    assert (kl_penalty(tiny, torch.zeros(3), "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_penalty(logp, logq, "k2")  # type: ignore[arg-type]


def test_equal_policies_give_ratio_one_and_nothing_clipped() -> None:
    logp = torch.log(torch.rand(2, 4) * 0.9 + 0.05)
    adv = torch.randn(2, 4)
    stats = clipped_policy_loss(logp, logp.clone(), adv, MASK, cliprange=0.2)
    assert stats.ratio_mean.item() == 1.0
    assert stats.clipfrac.item() == 0.0
    assert stats.approxkl.item() == 0.0
    assert stats.loss.item() == pytest.approx(-masked_mean(adv, MASK).item())
    assert kl_penalty(logp, logp.clone(), "k1").abs().max() == 0
    assert kl_penalty(logp, logp.clone(), "k3").abs().max() == 0


def test_the_surrogate_clips_a_ratio_outside_the_range() -> None:
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(1.1)]])  # ratios 1.5 (clipped) and 1.1
    adv = torch.ones(1, 2)
    mask = torch.ones(1, 2)
    stats = clipped_policy_loss(new, old, adv, mask, cliprange=0.2)
    assert stats.loss.item() == pytest.approx(-(1.2 + 1.1) / 2)
    assert stats.clipfrac.item() == 0.5
    new.requires_grad_(True)
    clipped_policy_loss(new, old, adv, mask, 0.2).loss.backward()
    assert new.grad is not None and new.grad[0, 0] == 0 and new.grad[0, 1] != 0


def test_the_value_loss_takes_the_worse_of_clipped_and_unclipped() -> None:
    old = torch.zeros(1, 2)
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 0.0]])
    loss, clipfrac = clipped_value_loss(values, old, returns, torch.ones(1, 2), 0.2)
    # token 0: unclipped error 0, clipped to 0.2 -> error 0.64; token 1: 0.01 both ways
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.01) / 2)
    assert clipfrac.item() == 0.5


def test_whitening_ignores_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 99.0, -99.0]])
    w = masked_whiten(x, MASK)
    real = w[MASK.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.std().item() == pytest.approx(1.0, abs=1e-3)
    assert w[1, 2:].abs().sum() == 0


def test_running_moments_match_the_statistics_of_everything_seen() -> None:
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, generator=g) * 3 + 2 for n in (5, 17, 8)]
    rm = RunningMoments()
    for b in batches:
        rm.update(b)
    everything = torch.cat(batches).double()
    assert rm.mean == pytest.approx(everything.mean().item())
    assert rm.std == pytest.approx(everything.std(unbiased=False).item())
    again = RunningMoments()
    again.load_state_dict(rm.state_dict())
    torch.testing.assert_close(again.normalize(everything), rm.normalize(everything))


def test_logprobs_and_entropy_from_logits() -> None:
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    labels = torch.tensor([[1, 0]])
    torch.testing.assert_close(
        logprobs_from_logits(logits, labels), torch.tensor([[math.log(0.5), math.log(0.75)]])
    )
    h = entropy_from_logits(logits)
    assert h[0, 0].item() == pytest.approx(math.log(2))
    assert h[0, 1].item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


# ---- uncertainty-aware KL ---------------------------------------------------------------------


def test_zero_uncertainty_gives_every_sample_exactly_the_base_beta() -> None:
    sigma = torch.zeros(3)
    for ref in (1.0, 0.3, None):  # None: the batch mean, 0 here
        assert (
            uncertainty_kl_coefs(0.05, sigma, 2.0, ref).tolist() == [torch.tensor(0.05).item()] * 3
        )
    kl = torch.tensor([[0.3, -0.1, 0.2, 0.4], [0.5, 0.1, 0.0, 0.0]]) * MASK
    scores = torch.tensor([1.0, -2.0])
    per_sample = token_rewards(
        scores, kl, MASK, uncertainty_kl_coefs(0.05, torch.zeros(2), 2.0, 1.0)
    )
    batch = token_rewards(scores, kl, MASK, 0.05)
    for a, b in zip(per_sample, batch, strict=True):
        assert torch.equal(a, b)  # exactly, not approximately


def test_a_more_uncertain_sample_gets_a_larger_beta_and_only_it() -> None:
    low = torch.tensor([0.1, 0.2, 0.3])
    high = torch.tensor([0.1, 0.9, 0.3])
    a, b = uncertainty_kl_coefs(0.1, low, 2.0, 0.5), uncertainty_kl_coefs(0.1, high, 2.0, 0.5)
    # β_i = β·(1 + scale·σ_i/σ_ref)
    assert a.tolist() == pytest.approx([0.1 * (1 + 2 * s / 0.5) for s in low.tolist()])
    assert b[1] > a[1]
    assert b[0] == a[0] and b[2] == a[2]
    # σ_ref = the batch mean: β is redistributed, its mean factor is 1 + scale
    c = uncertainty_kl_coefs(0.1, high, 2.0, None)
    assert c.mean().item() == pytest.approx(0.1 * 3)
    assert c.argsort().tolist() == high.argsort().tolist()
    # scale 0: the base β everywhere, whatever σ
    assert uncertainty_kl_coefs(0.1, high, 0.0, 0.5).tolist() == [torch.tensor(0.1).item()] * 3


def test_a_per_sample_beta_scales_only_its_own_rows_kl() -> None:
    kl = torch.ones(2, 4) * MASK
    _, non_score = token_rewards(torch.zeros(2), kl, MASK, torch.tensor([0.1, 0.5]))
    expected = torch.tensor([[-0.1] * 4, [-0.5, -0.5, 0.0, 0.0]])
    assert torch.allclose(non_score, expected)


def test_uncertainty_penalty_is_r_minus_lambda_sigma() -> None:
    r, sigma = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.5, 0.0, 2.0])
    assert uncertainty_penalty(r, sigma, 0.4).tolist() == pytest.approx([0.8, 0.0, -1.8])
    assert uncertainty_penalty(r, sigma, 0.0) is r  # λ = 0: untouched
    assert uncertainty_penalty(r, None, 0.4) is r  # no ensemble: untouched
    assert torch.equal(uncertainty_penalty(r, torch.zeros(3), 0.4), r)  # σ = 0: exactly r


@pytest.mark.parametrize("base", ["fixed", "adaptive"])
def test_the_uncertainty_controller_moves_its_base_beta_as_the_base_does(base: str) -> None:
    ctl = make_kl_controller("uncertainty", 0.2, 6.0, 10_000, base=base, scale=1.0, ref=1.0)  # type: ignore[arg-type]
    ref = make_kl_controller(base, 0.2, 6.0, 10_000)  # type: ignore[arg-type]
    assert isinstance(ctl, UncertaintyKLController)
    for kl in (9.0, 5.4, 1.0):
        ctl.update(kl, 512)
        ref.update(kl, 512)
        assert ctl.value == ref.value
    assert ctl.coefs(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([ref.value, 2 * ref.value])
    restored = make_kl_controller("uncertainty", 1.0, 6.0, 10_000, base=base)  # type: ignore[arg-type]
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
