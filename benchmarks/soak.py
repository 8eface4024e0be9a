"""Soak: a steady scoring load for --minutes; RSS of the server must not grow by 10 %.

    python benchmarks/soak.py --minutes 10

CONCURRENCY closed-loop clients (3 REST : 1 gRPC, as in benchmarks/overload.py) score HH
texts without pause; the server's RSS (process tree) is sampled every --every seconds. The
baseline is the RSS once the warm-up (--warmup-s) is over: allocator pools and tokenizer
caches fill in the first seconds and are not a leak. Reports RSS over time and fails when
the last sample exceeds the baseline by --max-growth. Results under bench-results/soak/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from harness import ROOT, RssSampler, default_server, load_note, machine
from overload import CONCURRENCY, ITEMS, Clients, Outcome, texts


async def load(base_url: str, grpc_target: str, seconds: float) -> list[Outcome]:
    clients = Clients(base_url, grpc_target, texts())
    stop = time.perf_counter() + seconds
    outcomes: list[Outcome] = []

    async def worker(i: int) -> None:
        while time.perf_counter() < stop:
            outcomes.append(await (clients.rest if i % 4 else clients.grpc)(None))

    try:
        await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    finally:
        await clients.close()
    return outcomes


def rss_table(samples: list[tuple[float, float]], rows: int = 10) -> list[str]:
    step = max(1, len(samples) // rows)
    picked = samples[::step]
    if samples and picked[-1] != samples[-1]:
        picked.append(samples[-1])
    return ["| t, s | RSS, MiB |", "|---:|---:|"] + [f"| {t:.0f} | {m:.0f} |" for t, m in picked]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--warmup-s", type=float, default=30.0)
    p.add_argument("--max-growth", type=float, default=0.10)
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "soak")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    with default_server("transformers") as server:
        assert server.proc is not None
        sampler = RssSampler(server.proc.pid, args.every)
        sampler.start()
        seconds = args.minutes * 60
        outcomes = asyncio.run(load(server.base_url, server.grpc_target, seconds))
        samples = sampler.stop()
        alive = server.proc.poll() is None
    after_warmup = [m for t, m in samples if t >= args.warmup_s] or [samples[-1][1]]
    baseline, last = after_warmup[0], samples[-1][1]
    growth = last / baseline - 1
    ok = [o for o in outcomes if o.status == "ok"]
    result = {
        "minutes": args.minutes,
        "machine": machine(),
        "load": load_note(load_before),
        "requests": len(outcomes),
        "ok": len(ok),
        "items_per_s": round(len(ok) * ITEMS / seconds, 1),
        "rss_mib": {
            "first": samples[0][1],
            "baseline": baseline,
            "last": last,
            "max": max(m for _, m in samples),
        },
        "growth": round(growth, 4),
        "samples": samples,
        "alive": alive,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Soak for {args.minutes:g} min on {result['machine']}; {result['load']} (other jobs "
        f"share the machine). {len(outcomes)} requests ({len(outcomes) - len(ok)} not ok), "
        f"{result['items_per_s']} items/s. RSS {baseline:.0f} MiB after the {args.warmup_s:.0f}"
        f" s warm-up, {last:.0f} MiB at the end: growth {growth:+.1%} "
        f"(limit {args.max_growth:.0%}).",
        "",
        *rss_table(samples),
    ]
    table = "\n".join(lines)
    (args.out / "soak.md").write_text(table + "\n")
    print(table)
    failed = growth > args.max_growth or not alive or len(ok) < len(outcomes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
