"""A whole PPO job: train, export the policy into the model repository, evaluate it on the
held-out prompts, write result.json. The CLI calls this; so will the jobs API."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rewardserve.training.ppo.config import PPOConfig
from rewardserve.training.ppo.evaluate import evaluate
from rewardserve.training.ppo.export import export_policy, free_name
from rewardserve.training.ppo.rewards import RewardSource
from rewardserve.training.ppo.rollout import RolloutBackend, TransformersRollout
from rewardserve.training.ppo.trainer import CheckpointHook, PPOTrainer, StepHook, step_seed


def build_reward(
    config: PPOConfig, service: str | None = None, api_key: str | None = None
) -> RewardSource:
    """The reward source a run asks for: an OpenRLHF /get_reward URL, a running service's
    gRPC Score (--service), else the scorer in this process."""
    if config.reward_url:
        from rewardserve.training.ppo.remote_rewards import OpenRLHFReward

        return OpenRLHFReward(config.reward_url)
    if service:
        from rewardserve.training.ppo.remote_rewards import ServiceReward

        return ServiceReward(service, config.reward_model, api_key=api_key)
    from rewardserve.config import Settings
    from rewardserve.training.ppo.rewards import InProcessReward

    settings = Settings(
        model_repository=config.model_repository,
        cache_dir=config.cache_dir,
        models=[],
        torch_threads=config.torch_threads or 0,
    )
    return InProcessReward(settings, config.reward_model)


def export_and_evaluate(trainer: PPOTrainer) -> dict[str, Any]:
    c = trainer.config
    root = c.model_repository
    name = free_name(root, c.export_name or f"{c.policy}-ppo-{trainer.run_id}")
    manifest = export_policy(
        trainer.policy.lm,
        trainer.tokenizer,
        root,
        name,
        trainer.policy_manifest,
        description=f"{c.policy} after {trainer.step} PPO steps ({c.advantage_estimator}) "
        f"on reward model {trainer.reward.model}",
    )
    out: dict[str, Any] = {"export_name": manifest.name, "export_folder": str(root / name)}
    if trainer.eval_prompts:
        queries = [trainer.query_ids(p) for p in trainer.eval_prompts]
        out["eval"] = evaluate(
            prompts=trainer.eval_prompts,
            queries=queries,
            trained=TransformersRollout(trainer.policy.lm, trainer.tokenizer, trainer.device),
            initial=TransformersRollout(trainer.reference, trainer.tokenizer, trainer.device),
            trained_lm=trainer.policy.lm,
            reference_lm=trainer.reference,
            tokenizer=trainer.tokenizer,
            reward=trainer.reward,
            pad_id=trainer.pad_id,
            device=trainer.device,
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            seed=step_seed(c.seed, 0, salt=2),
            chunk=c.mini_batch_size,
        )
    return out


def run_ppo(
    config: PPOConfig,
    reward: RewardSource,
    *,
    output_dir: Path | None = None,
    resume: bool = False,
    progress: bool = False,
    rollout: RolloutBackend | None = None,
    on_step: StepHook | None = None,
    on_checkpoint: CheckpointHook | None = None,
) -> dict[str, Any]:
    """Train, export, evaluate; the result (also written to <output_dir>/result.json).
    `on_step` / `on_checkpoint`: PPOTrainer.train's progress hooks."""
    started = time.perf_counter()
    trainer = PPOTrainer(config, reward, rollout, output_dir=output_dir, progress=progress)
    try:
        final = trainer.train(resume=resume, on_step=on_step, on_checkpoint=on_checkpoint)
        result = {
            "steps": trainer.step,
            "episodes": trainer.episode,
            "policy": config.policy,
            "reward_model": reward.model,
            "final_metrics": final,
            **export_and_evaluate(trainer),
            "wall_time_s": time.perf_counter() - started,
            "config": config.model_dump(mode="json"),
        }
    finally:
        trainer.close()
    path = trainer.output_dir / "result.json"
    path.write_text(json.dumps(result, indent=2))
    result["result_path"] = str(path)
    return result
