"""The PPO loop: rollouts, rewards, advantages, clipped updates, metrics and checkpoints.

One step: take batch_size prompts, sample samples_per_prompt responses each, score them,
compute per-token KL against the frozen reference, turn scores into advantages (GAE with the
value head, or the critic-free RLOO / GRPO baselines), then ppo_epochs passes of shuffled
mini-batches of the clipped surrogate (+ value loss for GAE, - entropy bonus).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from rewardserve.bon.service import policy_prompt_ids
from rewardserve.modeling import pad_token_id
from rewardserve.registry.dtypes import resolve_dtype
from rewardserve.registry.manifest import ModelManifest, resolve_source
from rewardserve.registry.repository import ModelRepository
from rewardserve.rewards.objectives import objective_values
from rewardserve.training.ppo import core
from rewardserve.training.ppo.checkpoint import (
    checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from rewardserve.training.ppo.config import ConfigError, PPOConfig, needs_uncertainty
from rewardserve.training.ppo.data import PromptOrder
from rewardserve.training.ppo.metrics import MetricsLog
from rewardserve.training.ppo.model import (
    Batch,
    PolicyWithValueHead,
    Precision,
    frozen_copy,
    load_policy,
    make_batch,
    policy_forward,
    sequence_logprobs,
)
from rewardserve.training.ppo.rewards import RewardBatch, RewardSource, score_batch
from rewardserve.training.ppo.rollout import RolloutBackend, TransformersRollout, eos_token_ids
from rewardserve.training.ppo.update import Rollouts, ppo_update

log = logging.getLogger(__name__)

SAMPLES_KEPT = 4
SAMPLE_PROMPT_CHARS = 500

# on_step(metrics, samples): after each step's metrics are written; samples are up to
# SAMPLES_KEPT (prompt text, response text, raw reward) of the step's rollouts.
StepHook = Callable[[dict[str, Any], list[tuple[str, str, float]]], None]
# on_checkpoint(step, folder): after a checkpoint is saved.
CheckpointHook = Callable[[int, Path], None]


def pick_device(kind: str) -> torch.device:
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(kind)


# Fields a resumed run may change: where it writes and how it reports, not what it computes.
RESUMABLE_CHANGES = frozenset(
    {"output_dir", "export_name", "report_to", "checkpoint_every", "keep_checkpoints",
     "eval_max_prompts", "torch_threads"}
)  # fmt: skip


def changed_fields(saved: dict[str, Any], config: PPOConfig) -> list[str]:
    now = config.model_dump(mode="json")
    # a field the checkpoint predates ran at its default
    defaults = PPOConfig.model_construct().model_dump(mode="json")
    return sorted(
        k for k in now if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != now[k]
    )


def no_ensemble_error(field: str, model: str) -> ConfigError:
    return ConfigError(
        field,
        f"needs the reward ensemble's uncertainty, and reward model '{model}' gave none "
        "(a single model, or a service without ensembles); name an ensemble reward model or "
        "use kl_controller fixed|adaptive and uncertainty_penalty 0",
    )


def prompt_display(prompt: Any) -> str:
    """A short text for a prompt in progress reports: its text, or its last message's."""
    text = getattr(prompt, "prompt", None)
    if text is None:
        messages = getattr(prompt, "messages", None) or []
        text = messages[-1].content if messages else str(prompt)
    return text if len(text) <= SAMPLE_PROMPT_CHARS else "..." + text[-SAMPLE_PROMPT_CHARS:]


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A per-step seed: samples differ between steps, and step N samples the same whether or
    not the run was resumed before it."""
    return (seed * 1_000_003 + step * 7919 + salt) % (2**31)


class PPOTrainer:
    def __init__(
        self,
        config: PPOConfig,
        reward: RewardSource,
        rollout: RolloutBackend | None = None,
        *,
        output_dir: Path | None = None,
        progress: bool = False,
    ) -> None:
        self.config = c = config
        self.reward = reward
        needed = needs_uncertainty(c)
        if needed and getattr(reward, "ensemble", None) is False:
            raise no_ensemble_error(needed, reward.model)  # before any model loads
        self.output_dir = Path(output_dir or c.output_dir)
        self.show_progress = progress
        if c.torch_threads:
            torch.set_num_threads(c.torch_threads)
        torch.manual_seed(c.seed)
        self.repository = ModelRepository(c.model_repository, c.cache_dir)
        assert c.policy is not None  # the config resolved the default
        entry = self.repository.entries[c.policy]
        assert entry.manifest is not None
        self.policy_manifest: ModelManifest = entry.manifest
        self.policy_folder = resolve_source(entry.manifest, entry.folder, c.cache_dir)
        self.device = pick_device(c.device)
        dtype = resolve_dtype(c.dtype or entry.manifest.dtype)
        self.precision = Precision(self.device, dtype == "bfloat16")

        lm, self.tokenizer = load_policy(self.policy_folder)
        self.policy = PolicyWithValueHead(lm).to(self.device)
        self.reference = frozen_copy(lm).to(self.device)
        self.eos_ids = eos_token_ids(self.tokenizer, lm)
        self.pad_id = pad_token_id(self.tokenizer)
        self.rollout = rollout or self._make_rollout(dtype)

        self.train_prompts, self.eval_prompts = c.split_prompts()
        self.train_queries = [self.query_ids(p) for p in self.train_prompts]
        self.order = PromptOrder(len(self.train_prompts), c.seed)

        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=c.learning_rate, eps=1e-5)
        self.updates_per_step = c.ppo_epochs * (c.sequences_per_step // c.mini_batch_size)
        total_updates = c.total_steps * self.updates_per_step
        if c.lr_scheduler == "linear":
            self.scheduler: torch.optim.lr_scheduler.LRScheduler = (
                torch.optim.lr_scheduler.LinearLR(
                    self.optimizer, start_factor=1.0, end_factor=0.0, total_iters=total_updates
                )
            )
        else:
            self.scheduler = torch.optim.lr_scheduler.ConstantLR(
                self.optimizer, factor=1.0, total_iters=0
            )
        self.kl_ctl = core.make_kl_controller(
            c.kl_controller, c.kl_coef, c.target_kl, c.horizon,
            base=c.uncertainty_kl_base, scale=c.uncertainty_kl_scale, ref=c.uncertainty_kl_ref,
        )  # fmt: skip
        self.moments = core.RunningMoments()
        self.step, self.episode = 0, 0
        self.run_id = time.strftime("%Y%m%d-%H%M%S")
        self.last_metrics: dict[str, Any] = {}
        self.last_samples: list[tuple[str, str, float]] = []

    # ---- set-up --------------------------------------------------------------------------
    def _make_rollout(self, dtype: str) -> RolloutBackend:
        backend = self.config.rollout_backend
        if backend == "auto":
            from rewardserve.policy.manager import vllm_installed

            backend = "vllm" if vllm_installed() else "transformers"
        if backend == "vllm":
            from rewardserve.training.ppo.vllm_rollout import VllmRollout

            return VllmRollout(
                self.policy_folder,
                self.tokenizer,
                dtype=dtype,
                max_model_len=self.policy_manifest.max_length,
                seed=self.config.seed,
            )
        return TransformersRollout(self.policy.lm, self.tokenizer, self.device)

    def query_ids(self, prompt: Any) -> list[int]:
        ids = policy_prompt_ids(SimpleNamespace(tokenizer=self.tokenizer), prompt)  # type: ignore[arg-type]
        room = self.policy_manifest.max_length - self.config.max_new_tokens
        return ids[-room:]  # keep the prompt's end, where the answer starts

    # ---- one step ------------------------------------------------------------------------
    def _rollout(self) -> tuple[list[Any], list[list[int]], list[list[int]]]:
        c = self.config
        idx = self.order.take(c.batch_size)
        queries = [self.train_queries[i] for i in idx]
        responses = self.rollout.generate(
            queries, c.samples_per_prompt, c.max_new_tokens, c.temperature,
            step_seed(c.seed, self.step),
        )  # fmt: skip
        k = c.samples_per_prompt
        rows_prompts = [self.train_prompts[i] for i in idx for _ in range(k)]
        rows_queries = [q for q in queries for _ in range(k)]
        return rows_prompts, rows_queries, responses

    @torch.no_grad()
    def _old_stats(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs, values, reference log-probs) before the update, a mini-batch at a time."""
        c, n = self.config, batch.input_ids.shape[0]
        logps, values = [], []
        with self.precision.autocast():
            for start in range(0, n, c.mini_batch_size):
                sub = batch.rows(torch.arange(start, min(start + c.mini_batch_size, n)))
                _, lp, v = policy_forward(self.policy, sub, c.temperature)
                logps.append(lp)
                values.append(v)
            ref = sequence_logprobs(self.reference, batch, c.temperature, c.mini_batch_size)
        return torch.cat(logps), torch.cat(values), ref

    def _objective(self, rewards: RewardBatch) -> list[float]:
        """Each sample's score before shaping: its reward (objective mean, or no members) or
        the ensemble objective of its members."""
        c = self.config
        if c.reward_objective == "mean" or rewards.members is None:
            return rewards.rewards
        return objective_values(
            c.reward_objective, rewards.members, c.objective_lambda, rewards.rewards
        )

    def _uncertainty(self, rewards: RewardBatch) -> torch.Tensor | None:
        if rewards.uncertainty is None:
            needed = needs_uncertainty(self.config)
            if needed:  # the first batch of a remote source that is no ensemble
                raise no_ensemble_error(needed, self.reward.model)
            return None
        return torch.tensor(rewards.uncertainty, dtype=torch.float32, device=self.device)

    def _scores(
        self, raw: list[float], has_eos: torch.Tensor, uncertainty: torch.Tensor | None = None
    ) -> torch.Tensor:
        c = self.config
        scores = torch.tensor(raw, dtype=torch.float32, device=self.device)
        # in reward units, before normalisation rescales the reward and the penalty alike
        scores = core.uncertainty_penalty(scores, uncertainty, c.uncertainty_penalty)
        if c.normalize_rewards:
            self.moments.update(scores)
            scores = self.moments.normalize(scores)
        if c.reward_clip is not None:
            scores = scores.clamp(-c.reward_clip, c.reward_clip)
        # after normalisation and clipping, so a response without EOS loses exactly the penalty
        return core.apply_missing_eos_penalty(scores, has_eos, c.missing_eos_penalty)

    def _kl_coefs(self, uncertainty: torch.Tensor | None) -> core.KLCoef:
        """β for the batch, or β_i per sequence (the uncertainty controller)."""
        if isinstance(self.kl_ctl, core.UncertaintyKLController):
            assert uncertainty is not None  # _uncertainty refused a batch without
            return self.kl_ctl.coefs(uncertainty)
        return self.kl_ctl.value

    def _advantages(
        self,
        scores: torch.Tensor,
        kl: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        beta: core.KLCoef | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(advantages, returns (gae only), non-score rewards). `beta`: the step's β or β_i
        (None: the controller's β)."""
        c = self.config
        beta = self.kl_ctl.value if beta is None else beta
        if c.advantage_estimator == "gae":
            rewards, non_score = core.token_rewards(scores, kl, mask, beta)
            adv, returns = core.gae(rewards, values, mask, c.gamma, c.lam)
        else:
            non_score = core.kl_non_score(kl, mask, beta)
            seq = scores + non_score.sum(1)
            fn = core.rloo_advantages if c.advantage_estimator == "rloo" else core.grpo_advantages
            adv, returns = fn(seq, c.samples_per_prompt)[:, None] * mask, None
        if c.whiten_advantages:
            adv = core.masked_whiten(adv, mask)
        return adv, returns, non_score

    def _update(
        self,
        batch: Batch,
        old_logp: torch.Tensor,
        old_values: torch.Tensor,
        adv: torch.Tensor,
        returns: torch.Tensor | None,
    ) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(step_seed(self.config.seed, self.step, salt=1))
        rollouts = Rollouts(batch, old_logp, old_values, adv, returns)
        return ppo_update(
            self.policy, self.optimizer, self.scheduler, rollouts, self.config,
            self.precision, gen,
        )  # fmt: skip

    def train_step(self) -> dict[str, Any]:
        c = self.config
        t0 = time.perf_counter()
        prompts, queries, responses = self._rollout()
        batch = make_batch(queries, responses, self.pad_id, self.device)
        old_logp, old_values, ref_logp = self._old_stats(batch)
        t1 = time.perf_counter()
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        rewards = score_batch(self.reward, prompts, texts)
        raw = rewards.rewards
        t2 = time.perf_counter()
        # one response of each of the first prompts: the samples a watcher reads
        k = c.samples_per_prompt
        self.last_samples = [
            (prompt_display(prompts[i]), texts[i], float(raw[i])) for i in range(0, len(texts), k)
        ][:SAMPLES_KEPT]

        mask = batch.mask
        has_eos = torch.tensor([bool(r) and r[-1] in self.eos_ids for r in responses])
        uncertainty = self._uncertainty(rewards)
        objective = self._objective(rewards)
        scores = self._scores(objective, has_eos.to(self.device), uncertainty)
        kl = core.kl_penalty(old_logp, ref_logp, c.kl_estimator) * mask
        beta = self.kl_ctl.value
        betas = self._kl_coefs(uncertainty)
        adv, returns, non_score = self._advantages(scores, kl, old_values, mask, betas)
        update = self._update(batch, old_logp, old_values, adv, returns)
        seq_kl = kl.sum(1)
        self.kl_ctl.update(seq_kl.mean().item(), n_steps=len(responses))
        t3 = time.perf_counter()
        self.rollout.sync_weights(self.policy.lm)  # measured here, whatever it reports
        t4 = time.perf_counter()

        self.step += 1
        self.episode += len(responses)
        non_score_sum = non_score.sum(1)
        return {
            "step": self.step,
            "episode": self.episode,
            "objective/kl": seq_kl.mean().item(),
            "objective/entropy": (-old_logp * mask).sum(1).mean().item(),
            "objective/non_score_reward": non_score_sum.mean().item(),
            "objective/rlhf_reward": (scores + non_score_sum).mean().item(),
            "objective/scores": scores.mean().item(),
            "objective/raw_scores": sum(raw) / len(raw),
            **update,
            "val/num_eos_tokens": int(has_eos.sum().item()),
            "lr": self.scheduler.get_last_lr()[0],
            "kl_coef": beta,
            **self._uncertainty_metrics(rewards, objective, uncertainty, betas),
            "response_length": mask.sum(1).mean().item(),
            "time/rollout_s": t1 - t0,
            "time/reward_s": t2 - t1,
            "time/update_s": t3 - t2,
            "time/weight_sync_s": t4 - t3,
            "time/step_s": t4 - t0,
        }

    def _uncertainty_metrics(
        self,
        rewards: RewardBatch,
        objective: list[float],
        uncertainty: torch.Tensor | None,
        betas: core.KLCoef,
    ) -> dict[str, float]:
        """An ensemble's step: mean σ, the objective's reward beside the members' mean, the
        penalty and the mean effective β. A single model's step adds nothing."""
        out: dict[str, float] = {}
        if isinstance(betas, torch.Tensor):
            out["kl_coef_effective"] = betas.double().mean().item()
        if uncertainty is None:
            return out
        means = [
            sum(m) / len(m) if m else r
            for m, r in zip(
                rewards.members or [None] * len(objective), rewards.rewards, strict=True
            )
        ]
        out["objective/uncertainty"] = uncertainty.mean().item()
        out["objective/members_mean"] = sum(means) / len(means)
        out["objective/reward_objective"] = sum(objective) / len(objective)
        if self.config.uncertainty_penalty:
            penalty = self.config.uncertainty_penalty * uncertainty
            out["objective/uncertainty_penalty"] = penalty.mean().item()
        return out

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "episode": self.episode,
            "run_id": self.run_id,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_moments": self.moments.state_dict(),
            "data": self.order.state_dict(),
            "last_metrics": self.last_metrics,
            "config": self.config.model_dump(mode="json"),
        }

    def save(self) -> Path:
        return save_checkpoint(
            self.output_dir / "checkpoints",
            self.step,
            self.policy.state_dict(),
            self.state_dict(),
            self.config.keep_checkpoints,
        )

    def resume(self) -> int | None:
        """Restore the newest checkpoint; the step it was taken at (None: there is none)."""
        found = checkpoints(self.output_dir / "checkpoints")
        if not found:
            return None
        step, folder = found[-1]
        model, state = load_checkpoint(folder)
        changed = changed_fields(state["config"], self.config)
        if changed:  # the run would not continue, it would become another run
            raise ConfigError(
                changed[0],
                f"differs from the run checkpointed in {folder} "
                f"(changed: {', '.join(changed)}); resume with the config it was started with",
            )
        self.policy.load_state_dict(model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.moments.load_state_dict(state["reward_moments"])
        self.order.load_state_dict(state["data"])
        self.step, self.episode, self.run_id = state["step"], state["episode"], state["run_id"]
        self.last_metrics = state["last_metrics"]
        self.rollout.sync_weights(self.policy.lm)
        set_rng_state(state["rng"])
        log.info("resumed from %s", folder)
        return step

    # ---- the run -------------------------------------------------------------------------
    def train(
        self,
        resume: bool = False,
        stop_at: int | None = None,
        *,
        on_step: StepHook | None = None,
        on_checkpoint: CheckpointHook | None = None,
    ) -> dict[str, Any]:
        """Run to total_steps (from the newest checkpoint when `resume`), or stop after step
        `stop_at` (an interruption: the schedule still runs to total_steps); the last step's
        metrics. `on_step` and `on_checkpoint` are called after each step's metrics are
        written and after each checkpoint is saved (the jobs worker reports them)."""
        c = self.config
        resumed = self.resume() if resume else None
        if resume and resumed is None:
            log.warning("no checkpoint in %s: starting from step 0", self.output_dir)
        metrics = MetricsLog(
            self.output_dir, resume_step=resumed, tensorboard=c.report_to == "tensorboard"
        )
        from rewardserve.training.ppo.progress import StepProgress

        try:
            with StepProgress(c.total_steps, self.step, enabled=self.show_progress) as bar:
                while self.step < min(c.total_steps, stop_at or c.total_steps):
                    self.last_metrics = self.train_step()
                    metrics.write(self.last_metrics)
                    bar.update(self.last_metrics)
                    if on_step is not None:
                        on_step(self.last_metrics, self.last_samples)
                    if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                        folder = self.save()
                        if on_checkpoint is not None:
                            on_checkpoint(self.step, folder)
        finally:
            metrics.close()
        return self.last_metrics

    def close(self) -> None:
        self.rollout.close()
