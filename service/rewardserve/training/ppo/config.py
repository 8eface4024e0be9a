"""Settings of one PPO run, validated before any model loads.

Names follow TRL's PPOConfig where TRL has the concept. Every field is checked on its own and
against the model repository (the policy and reward model must exist there, of that kind), so
a bad config is refused naming the field before a single weight is read.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from rewardserve.bon.offline import InputError, read_prompts
from rewardserve.config import default_cache_dir
from rewardserve.registry.repository import Kind, ModelRepository
from rewardserve.schemas.bon import PromptInput


class ConfigError(ValueError):
    """A config that cannot run; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"field '{field}': {message}")


def _repository(info: ValidationInfo) -> ModelRepository | None:
    root, cache = info.data.get("model_repository"), info.data.get("cache_dir")
    if root is None or cache is None:
        return None  # reported on its own field
    return ModelRepository(root, cache)


def _prompt_inputs(v: list[str | PromptInput] | None) -> list[PromptInput] | None:
    if v is None:
        return None
    if not v:
        raise ValueError("holds no prompts")
    out = []
    for i, p in enumerate(v):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            p = PromptInput(prompt=p)
        out.append(p)
    return out


def _resolve_model(kind: Kind, name: str | None, info: ValidationInfo) -> str | None:
    """The canonical repository name of `name` (None: the repository's default of `kind`)."""
    repo = _repository(info)
    if repo is None:
        return name
    of_kind = repo.of_kind(kind)
    noun, plural = ("policy", "policies") if kind == "policy" else ("reward model", "reward models")
    if name is None:
        default = repo.default_name(kind, of_kind)
        if default is None:
            raise ValueError(f"no default {noun} in {repo.root}; name one of: {sorted(of_kind)}")
        return default
    canonical = repo.canonical(name)
    if canonical not in of_kind:
        known = ", ".join(sorted(of_kind)) or "none"
        raise ValueError(f"no {noun} '{name}' in {repo.root} (its {plural}: {known})")
    why = repo.unservable(canonical)
    if why:
        raise ValueError(f"{noun} '{canonical}' cannot load: {why}")
    return canonical


def _needs_ensemble(what: str, info: ValidationInfo) -> None:
    """Refuse a setting that needs an ensemble's uncertainty when the reward model is known
    not to be one. An OpenRLHF URL never sends one; a local reward model is an ensemble when
    its manifest has an `ensemble` section (read defensively: a registry without ensembles
    has none); a remote service's model is checked when the run scores its first batch (and
    by the jobs API at submission)."""
    why = f"{what} the reward ensemble's uncertainty"
    if info.data.get("reward_url"):
        raise ValueError(f"{why}, and a reward_url (OpenRLHF /get_reward) returns rewards only")
    if (info.context or {}).get("remote_reward"):
        return
    repo, name = _repository(info), info.data.get("reward_model")
    if repo is None or name is None:
        return  # reported on its own field
    manifest = repo.entries[name].manifest
    if getattr(manifest, "ensemble", None) is None:
        raise ValueError(
            f"{why}, and reward model '{name}' is a single model (no `ensemble` in its "
            "manifest); name an ensemble reward model or use kl_controller fixed|adaptive "
            "and uncertainty_penalty 0"
        )


class PPOConfig(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    # ---- models (field order matters: later validators read the earlier fields) --------
    model_repository: Path = Path("models")
    """The model repository: the policy and reward model are looked up here, and the trained
    policy is exported into it."""

    cache_dir: Path = Field(default_factory=default_cache_dir)
    """Where built model weights live (as `rewardserve serve --cache-dir`)."""

    policy: str | None = Field(None, validate_default=True)
    """Policy to train, by repository name or alias (None: the repository's default policy).
    The frozen reference is a copy of its initial weights."""

    reward_url: str | None = Field(None, pattern=r"^https?://")
    """An OpenRLHF-shaped /get_reward URL to take rewards from (instead of a reward model of
    the repository)."""

    reward_model: str | None = Field(None, validate_default=True)
    """Reward model, by repository name or alias (None: the repository's default). With
    --service it is the name sent to that service."""

    dtype: Literal["auto", "float32", "bfloat16"] | None = None
    """Compute precision (None: the policy manifest's dtype). bfloat16 runs the forwards and
    backwards under autocast with float32 master weights; auto is bfloat16 where it is the
    faster precision (registry.dtypes), else float32."""

    # ---- data -------------------------------------------------------------------------
    prompts_file: Path | None = None
    """Training prompts as JSON lines, each {"prompt": ...} or {"messages": [...]} (instead of
    `prompts`)."""

    prompts: list[str | PromptInput] | None = Field(None, validate_default=True)
    """Training prompts inline: strings or {"prompt": ...} / {"messages": [...]} objects
    (instead of `prompts_file`)."""

    eval_prompts: list[str | PromptInput] | None = None
    """Held-out prompts for the final evaluation (None: `eval_fraction` of the prompts are held
    out and never trained on)."""

    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, validate_default=True)
    """Share of the prompts held out for evaluation when `eval_prompts` is not given (at least
    one prompt when > 0; 0: no evaluation)."""

    # ---- the schedule -----------------------------------------------------------------
    advantage_estimator: Literal["gae", "rloo", "grpo"] = "gae"
    """gae: PPO with a value head (GAE over per-token rewards). rloo: leave-one-out baseline
    over the samples of a prompt. grpo: group-normalised advantages. rloo and grpo learn no
    value function."""

    total_steps: int = Field(100, ge=1)
    """Optimisation steps (each: one batch of rollouts, then ppo_epochs over it)."""

    batch_size: int = Field(8, ge=1)
    """Prompts per step."""

    samples_per_prompt: int = Field(2, ge=1)
    """Responses sampled per prompt (rloo and grpo need at least 2)."""

    mini_batch_size: int = Field(8, ge=1)
    """Sequences per optimiser step within a PPO epoch; batch_size x samples_per_prompt must be
    a multiple of it."""

    ppo_epochs: int = Field(1, ge=1)
    """Passes over each batch of rollouts."""

    max_new_tokens: int = Field(32, ge=1)
    """Most tokens generated per response."""

    temperature: float = Field(1.0, gt=0.0, le=5.0)
    """Sampling temperature; log-probabilities are taken at the same temperature (as TRL)."""

    learning_rate: float = Field(1e-5, gt=0.0)
    """Peak AdamW learning rate."""

    lr_scheduler: Literal["linear", "constant"] = "linear"
    """linear: decays to zero at total_steps x optimiser steps; constant: fixed."""

    seed: int = Field(0, ge=0, lt=2**31)
    """Seed of the data split and order, the value head, sampling and mini-batch shuffles."""

    # ---- the objective ----------------------------------------------------------------
    kl_coef: float = Field(0.05, ge=0.0)
    """β: the per-token KL penalty's coefficient (the adaptive controller's initial value)."""

    kl_estimator: Literal["k1", "k3"] = "k1"
    """k1: logp - ref_logp (unbiased, may be negative per token); k3: (r - 1) - log r with
    r = ref/p (unbiased, never negative, lower variance)."""

    kl_controller: Literal["fixed", "adaptive", "uncertainty"] = "fixed"
    """fixed β; adaptive (Ziegler et al. 2019): β moves towards target_kl; uncertainty: each
    sample's β_i = β·(1 + uncertainty_kl_scale·σ_i/σ_ref), σ_i the ensemble reward model's
    standard deviation over its members on that sample (needs an ensemble), β itself set by
    `uncertainty_kl_base`."""

    uncertainty_kl_base: Literal["fixed", "adaptive"] = "fixed"
    """uncertainty only: the controller of the base β the per-sample factor multiplies."""

    uncertainty_kl_scale: float = Field(1.0, ge=0.0)
    """uncertainty only: how fast β_i grows with σ_i (0: β_i = β, the base controller)."""

    uncertainty_kl_ref: float | None = Field(1.0, gt=0.0)
    """uncertainty only: σ_ref, the uncertainty at which β_i = β·(1 + scale). A number: fixed,
    on the normalized-reward scale (1.0: one reward standard deviation), so β tightens as the
    whole batch drifts where the members disagree. None: the batch's mean σ, so β is only
    redistributed towards the batch's more uncertain samples (mean factor 1 + scale)."""

    target_kl: float = Field(6.0, gt=0.0)
    """adaptive only: the sequence KL the controller aims at."""

    horizon: int = Field(10000, ge=1)
    """adaptive only: how many sequences the controller's correction is spread over."""

    reward_objective: Literal["mean", "worst_case", "uncertainty_weighted"] = "mean"
    """How an ensemble's member rewards become a sample's score (Coste et al. 2023): mean: the
    reward the service gives (the members' mean); worst_case: the lowest member; uncertainty_
    weighted: members' mean − objective_lambda·variance. worst_case and uncertainty_weighted
    are on the members' (normalized) scale. With one reward model all three are its reward."""

    objective_lambda: float = Field(1.0, ge=0.0)
    """uncertainty_weighted only: λ, the weight of the members' variance."""

    uncertainty_penalty: float = Field(0.0, ge=0.0)
    """λ of the uncertainty penalty: each score becomes r − λ·σ, σ the members' standard
    deviation on that sample (0: none; > 0 needs an ensemble). Applied before
    normalize_rewards and reward_clip."""

    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """GAE discount."""

    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE λ."""

    cliprange: float = Field(0.2, gt=0.0)
    """ε of the clipped surrogate objective."""

    cliprange_value: float = Field(0.2, gt=0.0)
    """Clip range of the value loss (gae only)."""

    vf_coef: float = Field(0.1, ge=0.0)
    """Weight of the value loss (gae only)."""

    entropy_coef: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus (0: none)."""

    missing_eos_penalty: float | None = Field(None, ge=0.0)
    """Subtracted from the score of a response that ends without EOS (None: no penalty)."""

    normalize_rewards: bool = False
    """Normalise scores with a running mean and standard deviation over all batches so far."""

    reward_clip: float | None = Field(None, gt=0.0)
    """Clip (normalised) scores to ±reward_clip (None: no clipping)."""

    whiten_advantages: bool = True
    """Whiten advantages over the batch (mean 0, variance 1)."""

    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """Clip gradients to this global norm (None: no clipping)."""

    # ---- running ----------------------------------------------------------------------
    rollout_backend: Literal["auto", "transformers", "vllm"] = "auto"
    """transformers: `generate` with the live policy (no weight copy); vllm: an in-process
    vLLM engine that receives the weights after every step; auto: vllm where it is
    installed (1.4-1.5x faster per step's rollout and sync than transformers here, README
    "PPO rollouts"), else transformers."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda where available, else cpu."""

    torch_threads: int | None = Field(None, ge=1)
    """CPU threads torch may use (None: torch's default). Bound it when the trainer shares the
    machine with a serving process."""

    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every this many steps (0: never)."""

    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept (the newest ones)."""

    report_to: Literal["none", "tensorboard"] = "none"
    """tensorboard: also write TensorBoard event files to <output_dir>/tensorboard."""

    output_dir: Path = Path("ppo-output")
    """Folder of metrics.jsonl, checkpoints/ and result.json (the CLI's --output wins)."""

    export_name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    """Repository name of the exported policy (None: <policy>-ppo-<timestamp>)."""

    eval_max_prompts: int | None = Field(None, ge=1)
    """Evaluate on at most this many held-out prompts (None: all)."""

    # ---- validators -------------------------------------------------------------------
    @field_validator("policy")
    @classmethod
    def _policy_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        return _resolve_model("policy", v, info)

    @field_validator("reward_model")
    @classmethod
    def _reward_model_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("reward_url") or (info.context or {}).get("remote_reward"):
            return v  # scored elsewhere: that service knows its models, not this repository
        return _resolve_model("reward", v, info)

    @field_validator("kl_controller")
    @classmethod
    def _controller_needs_ensemble(cls, v: str, info: ValidationInfo) -> str:
        if v == "uncertainty":
            _needs_ensemble("kl_controller: uncertainty scales β by", info)
        return v

    @field_validator("uncertainty_penalty")
    @classmethod
    def _penalty_needs_ensemble(cls, v: float, info: ValidationInfo) -> float:
        if v > 0:
            _needs_ensemble(f"uncertainty_penalty {v} subtracts λ·σ,", info)
        return v

    @field_validator("prompts_file")
    @classmethod
    def _prompts_file(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        if not v.is_file():
            raise ValueError(f"{v} does not exist")
        try:
            read_prompts(v)
        except InputError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("prompts")
    @classmethod
    def _prompts(
        cls, v: list[str | PromptInput] | None, info: ValidationInfo
    ) -> list[PromptInput] | None:
        if "prompts_file" not in info.data:
            return _prompt_inputs(v)  # the file's own error is reported
        in_file = info.data["prompts_file"] is not None
        if v is None and not in_file:
            raise ValueError("give `prompts` (inline) or `prompts_file`")
        if v is not None and in_file:
            raise ValueError("give either `prompts` or `prompts_file`, not both")
        return _prompt_inputs(v)

    @field_validator("eval_prompts")
    @classmethod
    def _eval_prompts(cls, v: list[str | PromptInput] | None) -> list[PromptInput] | None:
        return _prompt_inputs(v)

    @field_validator("eval_fraction")
    @classmethod
    def _leaves_training_prompts(cls, v: float, info: ValidationInfo) -> float:
        inline, path = info.data.get("prompts"), info.data.get("prompts_file")
        if info.data.get("eval_prompts") is not None or not v:
            return v
        n = len(inline) if inline is not None else len(read_prompts(path)) if path else None
        if n is not None and n - max(1, round(v * n)) < 1:
            raise ValueError(
                f"holding out {v} of {n} prompts (at least one) leaves none to train on; "
                "give eval_prompts or eval_fraction: 0"
            )
        return v

    @field_validator("samples_per_prompt")
    @classmethod
    def _group_for_baselines(cls, v: int, info: ValidationInfo) -> int:
        estimator = info.data.get("advantage_estimator")
        if estimator in ("rloo", "grpo") and v < 2:
            raise ValueError(f"{estimator} compares the samples of a prompt: needs at least 2")
        return v

    @field_validator("mini_batch_size")
    @classmethod
    def _divides_batch(cls, v: int, info: ValidationInfo) -> int:
        b, k = info.data.get("batch_size"), info.data.get("samples_per_prompt")
        if b is not None and k is not None and (b * k) % v:
            raise ValueError(
                f"batch_size x samples_per_prompt = {b * k} sequences is not a multiple of {v}"
            )
        return v

    # ---- derived ----------------------------------------------------------------------
    def all_prompts(self) -> list[PromptInput]:
        if self.prompts is not None:
            return list(self.prompts)  # type: ignore[arg-type]  # validated to PromptInput
        assert self.prompts_file is not None
        return [p for _, p in read_prompts(self.prompts_file)]

    def split_prompts(self) -> tuple[list[PromptInput], list[PromptInput]]:
        """(train, held out): the held-out prompts are never trained on."""
        prompts = self.all_prompts()
        if self.eval_prompts is not None:
            held = list(self.eval_prompts)  # type: ignore[arg-type]
        elif self.eval_fraction > 0:
            order = list(range(len(prompts)))
            random.Random(self.seed).shuffle(order)
            k = max(1, round(self.eval_fraction * len(prompts)))
            held = [prompts[i] for i in sorted(order[:k])]
            prompts = [prompts[i] for i in sorted(order[k:])]
        else:
            held = []
        if self.eval_max_prompts is not None:
            held = held[: self.eval_max_prompts]
        return prompts, held

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.samples_per_prompt


def _field(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    # a union's branch names (str, PromptInput) are no field of the config: drop them
    field = ".".join(p for p in loc if p not in ("str", "PromptInput")) or "(root)"
    return field, first["msg"].removeprefix("Value error, ")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs (the value read as YAML: numbers, booleans, lists) into a mapping."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", f"'{pair}' is not key=value")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(key.strip(), f"'{value}' is not a YAML value: {e}") from None
    return out


def validate_config(raw: dict[str, Any], *, remote_reward: bool = False) -> PPOConfig:
    """`remote_reward`: rewards come from a running service (--service), so the reward model
    is that service's to resolve, not the local repository's."""
    try:
        return PPOConfig.model_validate(raw, context={"remote_reward": remote_reward})
    except ValidationError as e:
        raise ConfigError(*_field(e)) from None


def load_config(
    path: Path, overrides: dict[str, Any] | None = None, *, remote_reward: bool = False
) -> PPOConfig:
    """The config in a YAML file, `overrides` on top; a ConfigError names the bad field.

    Relative paths in the file (prompts_file, model_repository, output_dir) stay relative to
    the working directory, as the CLI's own paths are."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError("(file)", f"{path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError("(file)", f"{path} is not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("(root)", f"{path} must hold a mapping of fields")
    return validate_config(raw | (overrides or {}), remote_reward=remote_reward)


def needs_uncertainty(config: PPOConfig) -> str | None:
    """The field that needs an ensemble's uncertainty (None: none does)."""
    if config.kl_controller == "uncertainty":
        return "kl_controller"
    if config.uncertainty_penalty > 0:
        return "uncertainty_penalty"
    return None
