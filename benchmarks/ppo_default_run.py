"""One real PPO run on the default stack, for the README: SmolLM2-135M-Instruct trained
against the default reward model (minilm-hh-harmless) on HH-RLHF harmless prompts.

Writes the prompts (train and held-out, from disjoint conversations), a config, runs
`rewardserve ppo` (its progress bar shows), then plots reward, KL, β and response length over
the steps and prints the held-out before/after table from result.json, with a few samples to
read (reward hacking shows there first: one phrase repeated, empty answers, length blow-up).

    .venv/bin/python benchmarks/ppo_default_run.py --steps 16   # about 10-15 min, 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_bon import load_prompts  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    """Reward, KL, β and response length over the steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("objective/raw_scores", "reward-model score (raw)"),
        ("objective/rlhf_reward", "normalised score − β·KL"),
        ("objective/kl", "KL to reference (per sequence)"),
        ("kl_coef", "β"),
        ("response_length", "response length (tokens)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for label, metrics in runs.items():
            steps = [m["step"] for m in metrics]
            ax.plot(steps, [m.get(key, float("nan")) for m in metrics], marker=".", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="prompts per step")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--estimator", default="gae", choices=["gae", "rloo", "grpo"])
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--missing-eos-penalty", type=float, default=1.0)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--rollout-backend", default=None, help="vllm | transformers (default: ours)")
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--compare", type=Path, nargs="+", default=None,
        help="plot these finished runs' folders together into --output (a .png), no training",
    )  # fmt: skip
    args = ap.parse_args()
    if args.compare:
        runs = {}
        for run in args.compare:
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            runs[f"β={cfg['kl_coef']} ({cfg['advantage_estimator']})"] = read_metrics(run)
        plot(runs, args.output)
        return

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.output or ROOT / "bench-results" / f"ppo-default-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    train_count = args.steps * args.batch
    prompts = load_prompts(train_count + args.eval_prompts, seed=args.seed)
    # Held-out prompts come from other conversations than the training prompts.
    train, held_out = prompts[:train_count], prompts[train_count:]
    for name, rows in (("train", train), ("eval", held_out)):
        with open(out / f"{name}_prompts.jsonl", "w") as f:
            for msgs in rows:
                f.write(json.dumps({"messages": msgs}) + "\n")
    config = {
        "prompts_file": str(out / "train_prompts.jsonl"),
        "eval_prompts": [{"messages": m} for m in held_out],
        "model_repository": str(ROOT / "models"),
        "total_steps": args.steps,
        "batch_size": args.batch,
        "samples_per_prompt": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "advantage_estimator": args.estimator,
        "kl_coef": args.kl_coef,
        "learning_rate": args.lr,
        "normalize_rewards": True,
        "missing_eos_penalty": args.missing_eos_penalty,
        "seed": args.seed,
        "checkpoint_every": max(1, args.steps // 4),
    }
    if args.rollout_backend:
        config["rollout_backend"] = args.rollout_backend
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    cli = Path(sys.executable).with_name("rewardserve")
    start = time.monotonic()
    subprocess.run(
        [str(cli), "ppo", str(out / "config.yaml"), "--output", str(out / "run")],
        check=True,
        env=env,
    )
    wall = time.monotonic() - start
    plot({f"β={args.kl_coef}": read_metrics(out)}, out / "curves.png")
    result = json.loads((out / "run" / "result.json").read_text())
    summary = {"cpu": cpu_name(), "cores": os.cpu_count(), "wall_s": round(wall, 1)} | result
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    print(f"plot: {out / 'curves.png'}")


if __name__ == "__main__":
    main()
