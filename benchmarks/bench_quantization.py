"""Is int8 (torch dynamic quantization of the Linear layers) safe to offer for the default RM?

Scores the held-out HH pairs with the float32 and the int8 variants of the same weights and
prints pairwise accuracy, agreement with float32, reward error and throughput, side by side.

    python benchmarks/bench_quantization.py [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from rewardserve.config import default_cache_dir
from rewardserve.engine.loader import load_reward_model
from rewardserve.registry.manifest import load_manifest
from rewardserve.training.reward.data import load_pairs, split_pairs

DATA = Path(__file__).resolve().parents[2] / "shared/data/hh-harmless/pairs.jsonl.gz"


def scorer_for(model_dir: Path, dtype: str, root: Path):
    folder = root / f"rm-{dtype}"
    folder.mkdir()
    manifest = {
        "name": f"rm-{dtype}",
        "kind": "reward",
        "max_length": 256,
        "dtype": dtype,
        "source": {"kind": "cache", "path": model_dir.name},
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest))
    return load_reward_model(load_manifest(folder), folder, model_dir.parent, False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    cache = Path(os.environ.get("REWARDSERVE_CACHE_DIR") or default_cache_dir())
    ap.add_argument("--model-dir", type=Path, default=cache / "minilm-hh-harmless")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    report = json.loads((args.model_dir / "training_report.json").read_text())
    cfg = report["config"]
    _, held = split_pairs(load_pairs(DATA), cfg["eval_fraction"], cfg["seed"], cfg.get("max_pairs"))
    texts = [t for p in held for t in (p.chosen, p.rejected)]
    root = Path(tempfile.mkdtemp())
    rows, ref = [], None
    try:
        for dtype in ("float32", "int8"):
            scorer = scorer_for(args.model_dir, dtype, root)
            encoded = scorer.encode(texts)
            order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
            enc = [encoded[i] for i in order]  # length-sorted batches, as the service runs
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = []
                for i in range(0, len(enc), 32):
                    out += scorer.forward(enc[i : i + 32])
                times.append(time.perf_counter() - t0)
            rewards = [0.0] * len(texts)
            for pos, i in enumerate(order):
                rewards[i] = out[pos]
            acc = statistics.fmean(rewards[2 * k] > rewards[2 * k + 1] for k in range(len(held)))
            if ref is None:
                ref = rewards
            agree = statistics.fmean(
                (rewards[2 * k] > rewards[2 * k + 1]) == (ref[2 * k] > ref[2 * k + 1])
                for k in range(len(held))
            )
            err = statistics.fmean(abs(a - b) for a, b in zip(rewards, ref, strict=True))
            rows.append((dtype, acc, agree, err, len(texts) / statistics.median(times)))
    finally:
        shutil.rmtree(root)
    print(f"{len(held)} held-out pairs, torch threads {torch.get_num_threads()}")
    print("| dtype | pairwise acc | same choice as fp32 | mean abs reward diff | seq/s |")
    print("|---|---|---|---|---|")
    for dtype, acc, agree, err, sps in rows:
        print(f"| {dtype} | {acc:.3f} | {agree:.3f} | {err:.4f} | {sps:.1f} |")


if __name__ == "__main__":
    main()
