"""Uncertainty-aware PPO on tiny real models: the uncertainty KL controller, the r − λ·σ
penalty and the ensemble objectives, each exactly its base when the members agree."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ppo_models import PROMPTS, build_ppo_repository
from rewardserve.config import Settings
from rewardserve.schemas.bon import PromptInput
from rewardserve.training.ppo.config import ConfigError, PPOConfig, validate_config
from rewardserve.training.ppo.metrics import read_metrics
from rewardserve.training.ppo.rewards import (
    InProcessReward,
    RewardBatch,
    batch_of_results,
    score_batch,
)
from rewardserve.training.ppo.trainer import PPOTrainer, changed_fields


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ppo_repository(tmp_path_factory.mktemp("repo"))


def config(repo: Path, out: Path, **fields: Any) -> PPOConfig:
    base = {"model_repository": str(repo), "prompts": PROMPTS, "total_steps": 2,
            "batch_size": 4, "samples_per_prompt": 4, "mini_batch_size": 8,
            "max_new_tokens": 8, "torch_threads": 1, "learning_rate": 1e-2,
            "rollout_backend": "transformers", "output_dir": str(out)}  # fmt: skip
    # remote_reward: the ensemble is the test's reward source, not tiny-rm of the repository
    return validate_config(base | fields, remote_reward=True)


def vowel_share(r: str) -> float:
    return sum(c in "aeiou" for c in r) / max(1, len(r))


class VowelShare:
    """The toy task's reward (as test_ppo_trainer): the share of lowercase vowels."""

    model = "vowel-share"

    def score(self, prompts: Sequence[PromptInput], responses: Sequence[str]) -> list[float]:
        return [vowel_share(r) for r in responses]

    def close(self) -> None:
        pass


class VowelEnsemble(VowelShare):
    """Three members around the vowel share, `spread`·(length mod 3) apart, so samples
    differ in uncertainty; spread 0: the members agree exactly. The reward is the share
    itself, as a service returns the members' mean."""

    model = "vowel-ensemble"
    ensemble = True

    def __init__(self, spread: float) -> None:
        self.spread = spread

    def score_batch(self, prompts: Sequence[PromptInput], responses: Sequence[str]) -> RewardBatch:
        results = []
        for r in responses:
            b, d = vowel_share(r), self.spread * (len(r) % 3)
            members = [b - d, b, b + d]
            sigma = math.sqrt(2 / 3) * d
            results.append(SimpleNamespace(reward=b, members=members, uncertainty=sigma))
        return batch_of_results(results)


def _run(cfg: PPOConfig, source: Any) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    trainer = PPOTrainer(cfg, source)
    trainer.train()
    return read_metrics(Path(cfg.output_dir) / "metrics.jsonl"), trainer.policy.state_dict()


@pytest.mark.parametrize("base", ["fixed", "adaptive"])
def test_members_that_agree_reduce_exactly_to_the_base_controller(
    repo: Path, tmp_path: Path, base: str
) -> None:
    """σ = 0 on every sample: the uncertainty controller (and penalty, and an ensemble
    objective) give the same rewards, β, advantages, losses and weights as the base
    controller with the plain reward, to the last bit."""
    plain = config(repo, tmp_path / "plain", kl_controller=base, kl_coef=0.1, target_kl=0.01,
                   horizon=50)  # fmt: skip
    aware = config(repo, tmp_path / "aware", kl_controller="uncertainty",
                   uncertainty_kl_base=base, uncertainty_kl_scale=3.0, uncertainty_penalty=0.7,
                   reward_objective="uncertainty_weighted", kl_coef=0.1, target_kl=0.01,
                   horizon=50)  # fmt: skip
    m_plain, w_plain = _run(plain, VowelShare())
    m_aware, w_aware = _run(aware, VowelEnsemble(spread=0.0))
    for a, b in zip(m_plain, m_aware, strict=True):
        for k, v in a.items():
            if not k.startswith("time/"):
                assert b[k] == v, k
        assert b["objective/uncertainty"] == 0.0
        # every β_i is the base β (in float32, the per-token penalty's precision)
        assert b["kl_coef_effective"] == torch.tensor(a["kl_coef"]).item()
        assert b["objective/reward_objective"] == a["objective/raw_scores"]
    if base == "adaptive":  # the base β did move, the same way in both
        assert m_aware[1]["kl_coef"] != m_aware[0]["kl_coef"]
    for k, w in w_plain.items():
        assert torch.equal(w, w_aware[k]), k


def test_uncertain_samples_get_a_larger_beta(repo: Path, tmp_path: Path) -> None:
    cfg = config(repo, tmp_path, kl_controller="uncertainty", kl_coef=0.1,
                 uncertainty_kl_scale=2.0, uncertainty_kl_ref=0.05, total_steps=1)  # fmt: skip
    trainer = PPOTrainer(cfg, VowelEnsemble(spread=0.1))
    m = trainer.train()
    assert m["objective/uncertainty"] > 0
    assert m["kl_coef_effective"] > m["kl_coef"] == 0.1
    sigma = torch.tensor([0.0, 0.02, 0.1])
    betas = trainer._kl_coefs(sigma)
    assert isinstance(betas, torch.Tensor)
    assert betas.tolist() == pytest.approx([0.1, 0.1 * (1 + 2 * 0.4), 0.1 * (1 + 2 * 2)])
    # each sample's KL term is scaled by its own β
    kl = torch.ones(3, 2)
    mask = torch.ones(3, 2)
    _, _, non_score = trainer._advantages(torch.zeros(3), kl, torch.zeros(3, 2), mask, betas)
    assert non_score[:, 0].tolist() == pytest.approx((-betas).tolist())


def test_penalty_subtracts_lambda_sigma_before_normalisation(repo: Path, tmp_path: Path) -> None:
    cfg = config(repo, tmp_path, uncertainty_penalty=0.5, reward_clip=0.6, missing_eos_penalty=0.1)
    trainer = PPOTrainer(cfg, VowelEnsemble(spread=0.1))
    eos = torch.tensor([True, True, False])
    scores = trainer._scores([1.0, 0.2, 0.2], eos, torch.tensor([0.2, 0.4, 0.0]))
    # r − λσ, then clipped to ±0.6, then the missing-EOS penalty
    assert scores.tolist() == pytest.approx([0.6, 0.0, 0.1])


def test_objectives_on_hand_made_members(repo: Path, tmp_path: Path) -> None:
    batch = RewardBatch(
        rewards=[2.0, 7.0, 0.5],
        members=[[1.0, 2.0, 3.0], None, [0.5, 0.5, 0.5]],
        uncertainty=[math.sqrt(2 / 3), 0.0, 0.0],
    )
    got = {}
    for objective in ("mean", "worst_case", "uncertainty_weighted"):
        cfg = config(repo, tmp_path, reward_objective=objective, objective_lambda=0.5)
        got[objective] = PPOTrainer(cfg, VowelEnsemble(0.0))._objective(batch)
    assert got["mean"] == [2.0, 7.0, 0.5]  # the service's reward
    assert got["worst_case"] == [1.0, 7.0, 0.5]  # no members: the reward
    assert got["uncertainty_weighted"] == pytest.approx([2.0 - 0.5 * 2 / 3, 7.0, 0.5])


def test_a_single_model_is_refused_before_training(repo: Path, tmp_path: Path) -> None:
    rm = InProcessReward(Settings(model_repository=repo, torch_threads=1), "tiny-rm")
    try:
        assert rm.ensemble is False
        # one model: no members, no uncertainty, and exactly score()'s rewards
        prompts = [PromptInput(prompt="Hi"), PromptInput(prompt="Yo")]
        batch = score_batch(rm, prompts, ["hello", ""])
        assert batch.members is None and batch.uncertainty is None
        assert batch.rewards == rm.score(prompts, ["hello", ""])
        for field, fields in [
            ("kl_controller", {"kl_controller": "uncertainty"}),
            ("uncertainty_penalty", {"uncertainty_penalty": 0.2}),
        ]:
            with pytest.raises(ConfigError) as e:
                PPOTrainer(config(repo, tmp_path, **fields), rm)
            assert e.value.field == field
            assert "'tiny-rm' gave none" in str(e.value)
        # an ensemble objective is allowed: it is the plain reward
        PPOTrainer(config(repo, tmp_path, reward_objective="worst_case"), rm)
    finally:
        rm.close()


def test_a_source_that_cannot_tell_is_refused_at_its_first_batch(
    repo: Path, tmp_path: Path
) -> None:
    trainer = PPOTrainer(config(repo, tmp_path, kl_controller="uncertainty"), VowelShare())
    with pytest.raises(ConfigError) as e:
        trainer.train()
    assert e.value.field == "kl_controller"
    assert trainer.step == 0 and read_metrics(tmp_path / "metrics.jsonl") == []


def test_results_read_defensively() -> None:
    old = [SimpleNamespace(reward=1.0), SimpleNamespace(reward=2.0)]  # before the fields exist
    assert batch_of_results(old) == RewardBatch([1.0, 2.0])
    single = [SimpleNamespace(reward=1.0, members=None, uncertainty=None)]
    assert batch_of_results(single) == RewardBatch([1.0])
    no_sigma = [SimpleNamespace(reward=2.0, members=[1.0, 3.0], uncertainty=None)]
    assert batch_of_results(no_sigma).uncertainty == [1.0]  # the members' std
    mixed = [SimpleNamespace(reward=1.0, uncertainty=0.5), SimpleNamespace(reward=1.0)]
    with pytest.raises(ValueError, match="some results only"):
        batch_of_results(mixed)


def test_a_checkpoint_from_before_these_fields_resumes(repo: Path, tmp_path: Path) -> None:
    cfg = config(repo, tmp_path)
    saved = cfg.model_dump(mode="json")
    for k in ("uncertainty_kl_base", "uncertainty_kl_scale", "uncertainty_kl_ref",
              "reward_objective", "objective_lambda", "uncertainty_penalty"):  # fmt: skip
        del saved[k]
    assert changed_fields(saved, cfg) == []
    assert changed_fields(saved, cfg.model_copy(update={"objective_lambda": 2.0})) == [
        "objective_lambda"
    ]
