"""Scoring speed of the repository's reward models side by side in one run (`make bench`):
by default the default MiniLM reward model against the SmolLM2-135M one (`make smollm2-rm`).

Both are served by one in-process ScoringEngine with the server's default batching limits;
the load is a fixed number of one-item /v1/score requests from `--concurrency` concurrent
callers (closed loop) over the same HH texts at each model's max_length, the models taking
turns, --repeats runs each; the table reports medians. A model whose weights are not built
is left out with a note. Results go to bench-results/reward_models.*.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_bon import machine  # noqa: E402
from bench_ensemble import load_run  # noqa: E402
from bench_scoring import load_texts  # noqa: E402

from rewardserve.config import Settings, default_cache_dir  # noqa: E402
from rewardserve.engine.scoring import ScoringEngine  # noqa: E402

MODELS = ["minilm-hh-harmless", "smollm2-135m-hh-harmless"]


async def bench(args: argparse.Namespace) -> dict:
    settings = Settings(
        model_repository=ROOT / "models",
        cache_dir=Path(args.cache),
        torch_threads=args.threads,
        models=[],
        policies=[],
        jobs_enabled=False,
    )
    engine = ScoringEngine(settings)
    texts = load_texts(args.requests)
    loaded, skipped = [], {}
    for name in args.models:
        why = engine.repository.unservable(name)
        if why is None:
            await engine.load(name)
            loaded.append(name)
        else:
            skipped[name] = why
    engine.started = True
    try:
        for model in loaded:  # warm-up: first forwards of each shape are slow
            await load_run(engine, model, texts[: 2 * args.concurrency], args.concurrency)
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in loaded}
        for _ in range(args.repeats):
            for model in loaded:
                runs[model].append(await load_run(engine, model, texts, args.concurrency))
        params = {  # an ensemble's: every member's
            m: sum(
                p.numel() for member in engine.resolve(m).members
                for p in member.scorer.model.parameters()
            )
            for m in loaded
        }  # fmt: skip
    finally:
        await engine.close()
    rows = {
        m: {
            "items_s": statistics.median(r[0] for r in runs[m]),
            "p50_ms": statistics.median(r[1] for r in runs[m]),
            "params": params[m],
            "runs": runs[m],
        }
        for m in loaded
    }
    return {
        "machine": machine(),
        "threads": args.threads,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "rows": rows,
        "skipped": skipped,
    }


def table(result: dict) -> str:
    rows = result["rows"]
    lines = [
        f"{result['machine']}; torch threads {result['threads']}; "
        f"{result['requests']} one-item requests, concurrency {result['concurrency']}; "
        f"medians of {result['repeats']} runs",
        "",
        "| reward model | parameters | items/s | p50 latency (ms) | cost vs first |",
        "|---|---:|---:|---:|---:|",
    ]
    first = next(iter(rows.values()), None)
    for name, row in rows.items():
        cost = first["items_s"] / row["items_s"] if first else 1.0
        lines.append(
            f"| {name} | {row['params'] / 1e6:.0f}M | {row['items_s']:.1f} | "
            f"{row['p50_ms']:.1f} | {cost:.2f}x |"
        )
    for name, why in result["skipped"].items():
        lines.append(f"\n{name}: left out, {why}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="reward models to compare")
    parser.add_argument("--requests", type=int, default=96, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent callers")
    parser.add_argument("--repeats", type=int, default=3, help="runs per model (medians)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--cache", default=str(default_cache_dir()), help="model cache")
    parser.add_argument("--out", default=str(ROOT / "bench-results"), help="results folder")
    args = parser.parse_args()
    result = asyncio.run(bench(args))
    text = table(result)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_models.json").write_text(json.dumps(result, indent=2))
    (out / "reward_models.md").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
