"""The PPO trainer on tiny real models (CPU, one thread, a few seconds a run)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppo_models import PROMPTS, build_ppo_repository
from rewardserve.config import Settings
from rewardserve.registry.repository import ModelRepository
from rewardserve.schemas.bon import PromptInput
from rewardserve.training.ppo.config import ConfigError, PPOConfig, validate_config
from rewardserve.training.ppo.metrics import read_metrics
from rewardserve.training.ppo.rewards import InProcessReward
from rewardserve.training.ppo.run import run_ppo
from rewardserve.training.ppo.trainer import PPOTrainer


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ppo_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def rm(repo: Path) -> Any:
    reward = InProcessReward(Settings(model_repository=repo, torch_threads=1), "tiny-rm")
    yield reward
    reward.close()


def config(repo: Path, out: Path, **fields: Any) -> PPOConfig:
    base = {"model_repository": str(repo), "prompts": PROMPTS, "total_steps": 2,
            "batch_size": 4, "samples_per_prompt": 4, "mini_batch_size": 8,
            "max_new_tokens": 8, "torch_threads": 1,
            "rollout_backend": "transformers", "output_dir": str(out)}  # fmt: skip
    return validate_config(base | fields)


class VowelShare:
    """The reward under study in the toy task, not a stand-in for the scorer: the share of a
    response's characters that are lowercase vowels. The tiny policy starts near 0.2 and can
    only raise it by changing which tokens it samples, a learnable property of the text."""

    model = "vowel-share"

    def score(self, prompts: list[PromptInput], responses: list[str]) -> list[float]:
        return [sum(c in "aeiou" for c in r) / max(1, len(r)) for r in responses]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("estimator", ["gae", "rloo", "grpo"])
def test_step_zero_with_policy_equal_to_reference(
    repo: Path, rm: Any, tmp_path: Path, estimator: str
) -> None:
    cfg = config(repo, tmp_path, total_steps=1, advantage_estimator=estimator, ppo_epochs=2)
    trainer = PPOTrainer(cfg, rm)
    m = trainer.train()
    # the reference is a copy of the initial weights and the log-probs are computed in the same
    # chunks: the KL is exactly 0, not merely small
    assert m["objective/kl"] == 0.0
    assert m["objective/non_score_reward"] == 0.0
    # the first mini-batch runs before any optimiser step: new == old log-probs up to float
    # rounding between batch compositions
    assert m["first_minibatch/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert m["first_minibatch/clipfrac"] == 0.0
    assert m["first_minibatch/approxkl"] == pytest.approx(0.0, abs=1e-10)
    # later mini-batches did move the policy
    assert m["policy/approxkl_avg"] > 0.0
    assert (m["loss/value_avg"] > 0.0) == (estimator == "gae")


def test_scores_normalised_clipped_then_penalised(repo: Path, rm: Any, tmp_path: Path) -> None:
    cfg = config(repo, tmp_path, reward_clip=0.5, missing_eos_penalty=0.3)
    trainer = PPOTrainer(cfg, rm)
    scores = trainer._scores([10.0, 10.0, -10.0], torch.tensor([True, False, False]))
    # clipped to ±0.5 first, so a response without EOS loses exactly the penalty
    assert scores.tolist() == pytest.approx([0.5, 0.2, -0.8])


def _toy_run(repo: Path, out: Path, estimator: str, kl_coef: float) -> list[dict[str, Any]]:
    cfg = config(repo, out, advantage_estimator=estimator, kl_coef=kl_coef, total_steps=40,
                 learning_rate=3e-2, eval_fraction=0)  # fmt: skip
    PPOTrainer(cfg, VowelShare()).train()
    return read_metrics(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def toy_runs(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache: dict[tuple[str, float], list[dict[str, Any]]] = {}

    def get(estimator: str, kl_coef: float) -> list[dict[str, Any]]:
        key = (estimator, kl_coef)
        if key not in cache:
            cache[key] = _toy_run(repo, tmp_path_factory.mktemp("toy"), estimator, kl_coef)
        return cache[key]

    return get


def _mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


@pytest.mark.parametrize("estimator", ["gae", "rloo", "grpo"])
def test_toy_reward_rises_with_finite_kl(toy_runs: Any, estimator: str) -> None:
    steps = toy_runs(estimator, 0.01)
    first, se0 = _mean_se([s["objective/raw_scores"] for s in steps[:8]])
    last, se1 = _mean_se([s["objective/raw_scores"] for s in steps[-8:]])
    # significant: more than 5 standard errors of the step means, and large in itself
    assert last - first > 5 * math.hypot(se0, se1), (first, last)
    assert last - first > 0.2, (first, last)
    assert all(math.isfinite(s["objective/kl"]) for s in steps)


def test_larger_beta_ends_with_smaller_kl(toy_runs: Any) -> None:
    small = _mean_se([s["objective/kl"] for s in toy_runs("grpo", 0.01)[-8:]])[0]
    large = _mean_se([s["objective/kl"] for s in toy_runs("grpo", 1.0)[-8:]])[0]
    assert large < small / 5, (small, large)


def test_metrics_have_trl_names(toy_runs: Any) -> None:
    m = toy_runs("gae", 0.01)[-1]
    names = ["objective/kl", "objective/entropy", "objective/non_score_reward",
             "objective/rlhf_reward", "objective/scores", "policy/approxkl_avg",
             "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
             "policy/entropy_avg", "val/ratio", "val/num_eos_tokens", "lr", "episode", "step",
             "kl_coef", "response_length", "time/rollout_s", "time/reward_s",
             "time/update_s", "time/weight_sync_s", "time/step_s"]  # fmt: skip
    assert set(names) <= set(m)
    assert (m["step"], m["episode"]) == (40, 40 * 16)
    assert m["lr"] == pytest.approx(0.0, abs=1e-12)  # linear decay to zero at the last step


def test_adaptive_controller_moves_beta(repo: Path, rm: Any, tmp_path: Path) -> None:
    cfg = config(repo, tmp_path, total_steps=3, kl_controller="adaptive", kl_coef=0.1,
                 target_kl=100.0, horizon=100, learning_rate=1e-2)  # fmt: skip
    PPOTrainer(cfg, rm).train()
    betas = [m["kl_coef"] for m in read_metrics(tmp_path / "metrics.jsonl")]
    # KL far below target: β falls by the clipped 20 % x 16 sequences / horizon 100 per step
    assert betas[1] == pytest.approx(0.1 * (1 - 0.2 * 16 / 100))
    assert betas[2] == pytest.approx(betas[1] * (1 - 0.2 * 16 / 100))


def test_resume_from_checkpoint_continues_exactly(repo: Path, rm: Any, tmp_path: Path) -> None:
    """CPU, one thread, deterministic ops, every random draw seeded per step: a run resumed
    from its step-2 checkpoint repeats steps 3-4 to the last bit (compared to 1e-6 only to
    leave room for a platform's summation order, which this one does not change)."""
    a, b = tmp_path / "a", tmp_path / "b"
    fields = {
        "total_steps": 4,
        "checkpoint_every": 2,
        "keep_checkpoints": 1,
        "learning_rate": 1e-2,
        "normalize_rewards": True,
        "kl_controller": "adaptive",
    }
    PPOTrainer(config(repo, a, **fields), rm).train()
    assert [p.name for p in (a / "checkpoints").iterdir()] == ["step-4"]
    PPOTrainer(config(repo, b, **fields), rm).train(stop_at=2)
    PPOTrainer(config(repo, b, **fields), rm).train(resume=True)
    ma, mb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [m["step"] for m in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb, strict=True):
        for k, v in x.items():
            if not k.startswith("time/"):
                assert y[k] == pytest.approx(v, rel=1e-6, abs=1e-6), k
    # a different objective is another run, not a continuation
    with pytest.raises(ConfigError) as e:
        PPOTrainer(config(repo, b, **(fields | {"kl_coef": 0.5})), rm).train(resume=True)
    assert e.value.field == "kl_coef"


def test_export_is_a_policy_of_the_repository(repo: Path, rm: Any, tmp_path: Path) -> None:
    cfg = config(repo, tmp_path, export_name="tiny-chat-trained", learning_rate=1e-2)
    result = run_ppo(cfg, rm)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["export_name"] == result["export_name"] == "tiny-chat-trained"
    for key in ("steps", "wall_time_s", "config", "final_metrics", "eval"):
        assert key in saved
    ev = saved["eval"]
    assert ev["prompts"] == 1
    for side in ("trained", "initial"):
        assert set(ev[side]["reward"]) == {"mean", "stderr", "n"}
    assert math.isfinite(ev["kl_to_reference"]["mean"])
    sample = ev["samples"][0]
    gain = sample["trained"]["reward"] - sample["initial"]["reward"]
    assert ev["reward_gain"]["mean"] == pytest.approx(gain)  # one prompt: the paired gain

    repository = ModelRepository(repo, tmp_path / "cache")
    policies = repository.of_kind("policy")
    assert "tiny-chat-trained" in policies
    assert repository.unservable("tiny-chat-trained") is None
    weights = repo / "tiny-chat-trained" / "weights"
    lm = AutoModelForCausalLM.from_pretrained(weights)
    assert not any("value_head" in k for k in lm.state_dict())
    assert AutoTokenizer.from_pretrained(weights).chat_template
    # the exported weights are the trained ones, not the initial ones
    initial = AutoModelForCausalLM.from_pretrained(repo / "tiny-chat" / "weights")
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(lm.state_dict()[w], initial.state_dict()[w])


def test_tensorboard_events_beside_the_metrics(repo: Path, rm: Any, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    PPOTrainer(config(repo, tmp_path, report_to="tensorboard"), rm).train()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    kl = events.Scalars("objective/kl")
    assert [e.step for e in kl] == [1, 2]
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert kl[1].value == pytest.approx(lines[1]["objective/kl"], abs=1e-6)


def test_queries_and_rollouts(repo: Path, rm: Any, tmp_path: Path) -> None:
    trainer = PPOTrainer(config(repo, tmp_path), rm)
    tok = trainer.tokenizer
    first = trainer.train_prompts[0]
    assert first.messages is not None  # the chat form goes through the policy's template
    expected = tok.apply_chat_template(
        [m.model_dump() for m in first.messages], add_generation_prompt=True, tokenize=False
    )
    assert tok.decode(trainer.train_queries[0]) == expected
    queries = trainer.train_queries[:3]
    a = trainer.rollout.generate(queries, 2, 8, 1.0, seed=5)
    assert a == trainer.rollout.generate(queries, 2, 8, 1.0, seed=5)  # the seed fixes them
    assert a != trainer.rollout.generate(queries, 2, 8, 1.0, seed=6)
    assert len(a) == 6
    for r in a:  # as sampled: up to and including the first EOS, else max_new_tokens long
        eos = [i for i, t in enumerate(r) if t in trainer.eos_ids]
        assert eos == [len(r) - 1] if eos else len(r) == 8


def test_cut_at_eos() -> None:
    from rewardserve.training.ppo.rollout import cut_at_eos

    assert cut_at_eos([5, 6, 2, 2, 2], {2}) == [5, 6, 2]
    assert cut_at_eos([5, 6, 7], {2}) == [5, 6, 7]
    assert cut_at_eos([9, 5, 3], {2, 3}) == [9, 5, 3]


def test_step_and_checkpoint_hooks(repo: Path, rm: Any, tmp_path: Path) -> None:
    cfg = config(repo, tmp_path, total_steps=3, checkpoint_every=2, eval_fraction=0)
    steps: list[tuple[dict[str, Any], list[tuple[str, str, float]]]] = []
    saved: list[tuple[int, Path]] = []
    trainer = PPOTrainer(cfg, rm)
    try:
        trainer.train(
            on_step=lambda m, s: steps.append((dict(m), list(s))),
            on_checkpoint=lambda step, path: saved.append((step, path)),
        )
    finally:
        trainer.close()
    written = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m, _ in steps] == [1, 2, 3]
    assert [m for m, _ in steps] == written  # called once each step's metrics are written
    for _, samples in steps:
        # one response of each of the first 4 prompts (batch_size 4): text, reply, raw reward
        assert len(samples) == 4
        for prompt, response, reward in samples:
            assert prompt and isinstance(response, str) and isinstance(reward, float)
    assert [step for step, _ in saved] == [2]
    assert (saved[0][1] / "policy.pt").is_file()
    # messages prompts are shown by their last message, not as an object's repr
    shown = {p for _, s in steps for p, _, _ in s}
    assert shown <= {
        "Tell me a story.",
        "Is the sky blue?",
        *[p for p in PROMPTS if isinstance(p, str)],
    }
