"""PPOConfig: every bad field is refused naming it, before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ppo_models import PROMPTS, build_ppo_repository
from rewardserve.training.ppo.config import ConfigError, load_config, parse_overrides


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ppo_repository(tmp_path_factory.mktemp("repo"))


def write(path: Path, **fields: object) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


# (overrides, the field the error must name)
BAD = [
    ({"total_steps": -3}, "total_steps"),
    ({"total_steps": 0}, "total_steps"),
    ({"advantage_estimator": "ppo2"}, "advantage_estimator"),
    ({"policy": "no-such-policy"}, "policy"),
    ({"reward_model": "no-such-rm"}, "reward_model"),
    ({"policy": "tiny-rm"}, "policy"),  # a reward model is no policy
    ({"reward_model": "tiny-chat"}, "reward_model"),
    ({"prompts": []}, "prompts"),
    ({"prompts": None}, "prompts"),
    ({"prompts": [{"text": "x"}]}, "prompts.0"),
    ({"batch_size": 3, "samples_per_prompt": 2, "mini_batch_size": 4}, "mini_batch_size"),
    ({"prompts": None, "prompts_file": "/nonexistent/prompts.jsonl"}, "prompts_file"),
    ({"advantage_estimator": "rloo", "samples_per_prompt": 1}, "samples_per_prompt"),
    ({"advantage_estimator": "grpo", "samples_per_prompt": 1}, "samples_per_prompt"),
    ({"kl_estimator": "k2"}, "kl_estimator"),
    ({"kl_controller": "pid"}, "kl_controller"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"temperature": 0}, "temperature"),
    ({"lam": 1.5}, "lam"),
    ({"rollout_backend": "sglang"}, "rollout_backend"),
    ({"device": "tpu"}, "device"),
    ({"eval_fraction": 1.0}, "eval_fraction"),
    ({"prompts": ["only one"], "eval_fraction": 0.5}, "eval_fraction"),
    ({"reward_url": "ftp://x"}, "reward_url"),
    ({"no_such_field": 1}, "no_such_field"),
    # tiny-rm is a single model: nothing to take an uncertainty from
    ({"kl_controller": "uncertainty"}, "kl_controller"),
    ({"uncertainty_penalty": 0.1}, "uncertainty_penalty"),
    ({"kl_controller": "uncertainty", "reward_url": "http://x/get_reward"}, "kl_controller"),
    ({"uncertainty_penalty": -1}, "uncertainty_penalty"),
    ({"uncertainty_kl_scale": -1}, "uncertainty_kl_scale"),
    ({"uncertainty_kl_ref": 0}, "uncertainty_kl_ref"),
    ({"uncertainty_kl_base": "uncertainty"}, "uncertainty_kl_base"),
    ({"reward_objective": "median"}, "reward_objective"),
    ({"objective_lambda": -0.5}, "objective_lambda"),
]


def base(repo: Path) -> dict[str, object]:
    return {"model_repository": str(repo), "prompts": PROMPTS, "batch_size": 2,
            "samples_per_prompt": 2, "mini_batch_size": 2}  # fmt: skip


@pytest.mark.parametrize(("bad", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_config_is_refused_naming_the_field(
    repo: Path, tmp_path: Path, bad: dict[str, object], field: str
) -> None:
    path = write(tmp_path / "c.yaml", **(base(repo) | bad))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.field == field, str(e.value)
    assert f"'{field}'" in str(e.value)


def test_good_config_resolves_the_default_models(repo: Path, tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "c.yaml", **base(repo)), {"total_steps": 3})
    assert (cfg.policy, cfg.reward_model, cfg.total_steps) == ("tiny-chat", "tiny-rm", 3)
    train, held = cfg.split_prompts()
    assert len(held) == 1 and held[0] not in train and len(train) == len(PROMPTS) - 1


def test_prompts_file_of_both_forms(repo: Path, tmp_path: Path) -> None:
    lines = [{"prompt": "Hi"}, {"messages": [{"role": "user", "content": "Hello"}]}] * 3
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    raw = base(repo) | {"prompts": None, "prompts_file": str(f), "eval_fraction": 0}
    cfg = load_config(write(tmp_path / "c.yaml", **raw))
    train, held = cfg.split_prompts()
    assert len(train) == 6 and held == [] and train[1].messages is not None


def test_bad_line_in_prompts_file_names_the_field(repo: Path, tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    raw = base(repo) | {"prompts": None, "prompts_file": str(f)}
    with pytest.raises(ConfigError, match="line 2") as e:
        load_config(write(tmp_path / "c.yaml", **raw))
    assert e.value.field == "prompts_file"


def test_overrides_are_yaml_values() -> None:
    assert parse_overrides(["total_steps=5", "whiten_advantages=false", "policy=x"]) == {
        "total_steps": 5, "whiten_advantages": False, "policy": "x"}  # fmt: skip
    with pytest.raises(ConfigError):
        parse_overrides(["total_steps"])


def test_remote_reward_model_is_not_looked_up_locally(repo: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", **(base(repo) | {"reward_model": "served-elsewhere"}))
    assert load_config(path, remote_reward=True).reward_model == "served-elsewhere"
    with_url = {"reward_url": "http://rm:5000/get_reward"}
    assert load_config(path, with_url).reward_model == "served-elsewhere"
    with pytest.raises(ConfigError, match="reward_model"):
        load_config(path)


def test_single_model_refusals_say_why(repo: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", **base(repo), kl_controller="uncertainty")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.field == "kl_controller"
    assert "'tiny-rm' is a single model" in str(e.value)


def test_ensemble_objectives_and_remote_uncertainty_are_accepted(
    repo: Path, tmp_path: Path
) -> None:
    """Objectives reduce to the plain reward of a single model: allowed. A remote service's
    model is checked when it scores (the trainer) or at job submission, not here."""
    for objective in ("mean", "worst_case", "uncertainty_weighted"):
        cfg = load_config(write(tmp_path / "o.yaml", **base(repo), reward_objective=objective))
        assert cfg.reward_objective == objective
    remote = write(tmp_path / "r.yaml", **base(repo), kl_controller="uncertainty",
                   uncertainty_penalty=0.5, uncertainty_kl_ref=None)  # fmt: skip
    cfg = load_config(remote, remote_reward=True)
    assert (cfg.kl_controller, cfg.uncertainty_penalty, cfg.uncertainty_kl_ref) == (
        "uncertainty",
        0.5,
        None,
    )
