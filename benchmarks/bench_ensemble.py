"""The cost of an ensemble reward model against a single one, side by side in one run
(`make bench`).

Members are the default reward model (MiniLM, `make models`) with perturbed heads: the same
backbone weights and tokenizer, a classifier weight each of its own, so an ensemble of k
costs what k trained members would (k forwards per item; one tokenization, shared). Both
models are served by the in-process ScoringEngine with the server's default batching
limits, the load a fixed number of one-item /v1/score requests from `--concurrency`
concurrent callers (closed loop), HH texts at max_length 256. Each model runs --repeats
times, alternating; the table reports medians. Results go to bench-results/ensemble.*.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_bon import machine  # noqa: E402
from bench_scoring import load_texts  # noqa: E402

from rewardserve.config import Settings, default_cache_dir  # noqa: E402
from rewardserve.engine.scoring import ScoringEngine  # noqa: E402
from rewardserve.schemas.scoring import ScoreRequest  # noqa: E402

DEFAULT_MODEL = "minilm-hh-harmless"
MAX_LENGTH = 256
THREADS = 2
HEAD_NOISE = 0.05
"""Std of the noise added to each member's classifier weight (the trained one's entries
are of order 0.1): members that disagree a little, as differently seeded ones do."""


def manifest(name: str, source: dict, **extra: object) -> dict:
    base = yaml.safe_load((ROOT / "models" / DEFAULT_MODEL / "model.yaml").read_text())
    return base | {"name": name, "max_length": MAX_LENGTH, "source": source, **extra}


def make_repo(weights: Path, root: Path, k: int) -> Path:
    """single: the default model as it is; ensemble: k members of it, heads perturbed."""
    repo = root / "repo"
    (repo / "single").mkdir(parents=True)
    single = manifest("single", {"kind": "cache", "path": weights.name}, default=True)
    (repo / "single" / "model.yaml").write_text(yaml.safe_dump(single))
    members = repo / "ensemble" / "weights" / "members"
    tensors = load_file(str(weights / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for i in range(k):
        out = members / str(i)
        out.mkdir(parents=True)
        for file in weights.iterdir():
            if file.is_file() and file.name != "model.safetensors":
                (out / file.name).write_bytes(file.read_bytes())
        head = tensors["classifier.weight"]
        noisy = dict(tensors)
        noisy["classifier.weight"] = head + HEAD_NOISE * torch.randn(head.shape, generator=gen)
        save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    rels = [f"members/{i}" for i in range(k)]
    ens = manifest(
        "ensemble", {"kind": "repository", "path": "weights"}, ensemble={"members": rels}
    )
    ens.pop("default", None)
    (repo / "ensemble" / "model.yaml").write_text(yaml.safe_dump(ens))
    return repo


async def load_run(
    engine: ScoringEngine, model: str, texts: list[str], concurrency: int
) -> tuple[float, float]:
    """(items/s, p50 latency in ms) of one-item requests over `texts`, `concurrency` at
    a time."""
    queue = list(reversed(texts))
    latencies: list[float] = []

    async def caller() -> None:
        while queue:
            text = queue.pop()
            req = ScoreRequest.model_validate({"model": model, "items": [{"text": text}]})
            t0 = time.perf_counter()
            await engine.score(req)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return len(texts) / elapsed, statistics.median(latencies) * 1000


async def bench(args: argparse.Namespace) -> dict:
    weights = Path(args.cache) / DEFAULT_MODEL
    if not (weights / "model.safetensors").exists():
        raise SystemExit(f"default reward model not built at {weights} (run `make models`)")
    texts = load_texts(args.requests)
    with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as tmp:
        repo = make_repo(weights, Path(tmp), args.members)
        settings = Settings(
            model_repository=repo, cache_dir=Path(args.cache), torch_threads=args.threads
        )
        engine = ScoringEngine(settings)
        await engine.start()
        try:
            models = {"single": "single model", "ensemble": f"ensemble of {args.members}"}
            for model in models:  # warm-up: first forwards of each shape are slow
                await load_run(engine, model, texts[: 2 * args.concurrency], args.concurrency)
            runs: dict[str, list[tuple[float, float]]] = {m: [] for m in models}
            for _ in range(args.repeats):
                for model in models:
                    runs[model].append(await load_run(engine, model, texts, args.concurrency))
            probe = await engine.score(
                ScoreRequest.model_validate({"model": "ensemble", "items": [{"text": texts[0]}]})
            )
        finally:
            await engine.close()
    rows = {
        m: {
            "label": label,
            "items_s": statistics.median(r[0] for r in runs[m]),
            "p50_ms": statistics.median(r[1] for r in runs[m]),
            "runs": runs[m],
        }
        for m, label in models.items()
    }
    return {
        "machine": machine(),
        "threads": args.threads,
        "members": args.members,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "example_uncertainty": probe.results[0].uncertainty,
        "rows": rows,
    }


def table(result: dict) -> str:
    single = result["rows"]["single"]
    lines = [
        f"{result['machine']}; torch threads {result['threads']}; "
        f"{result['requests']} one-item requests, concurrency {result['concurrency']}, "
        f"max_length {MAX_LENGTH}; medians of {result['repeats']} runs",
        "",
        "| model | items/s | p50 latency (ms) | cost vs single |",
        "|---|---:|---:|---:|",
    ]
    for row in result["rows"].values():
        cost = single["items_s"] / row["items_s"]
        lines.append(
            f"| {row['label']} | {row['items_s']:.1f} | {row['p50_ms']:.1f} | {cost:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=3, help="ensemble size k")
    parser.add_argument("--requests", type=int, default=192, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent callers")
    parser.add_argument("--repeats", type=int, default=3, help="runs per model (medians)")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads")
    parser.add_argument("--cache", default=str(default_cache_dir()), help="model cache")
    parser.add_argument("--out", default=str(ROOT / "bench-results"), help="results folder")
    args = parser.parse_args()
    if args.members < 2:
        parser.error("--members: an ensemble has at least 2")
    result = asyncio.run(bench(args))
    text = table(result)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ensemble.json").write_text(json.dumps(result, indent=2))
    (out / "ensemble.md").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
