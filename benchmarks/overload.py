"""Overload at several times capacity: fast rejections, no late successes, no crash, recovery.

    python benchmarks/overload.py --factor 4 --seconds 20

1. before: CONCURRENCY closed-loop clients score for --seconds; their rate is the capacity.
2. overload: requests arrive open-loop at --factor x that rate (3 REST : 1 gRPC), each with
   a deadline (X-Request-Timeout / gRPC timeout) of --deadline seconds, for --seconds.
3. after: the closed-loop clients again, once the queue has drained.

Reports and checks: 429 / RESOURCE_EXHAUSTED answered fast (their latency percentiles), no
success answered after its deadline, the server alive and healthy, and the throughput after
the overload side by side with the one before. Results under bench-results/overload/.
The service runs the default reward model (transformers policy backend: no vLLM engine).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
from harness import ROOT, default_server, load_note, machine, tree_rss_mib

from rewardserve.v1 import scoring_pb2 as pb
from rewardserve.v1 import scoring_pb2_grpc as pb_grpc

DATA = ROOT.parent / "shared/data/hh-harmless/pairs.jsonl.gz"
CONCURRENCY = 4  # closed-loop clients measuring capacity: enough to keep batches full
ITEMS = 8  # texts per score request
LATE_SLACK_S = 0.05  # client-side timing noise tolerated above a deadline


@dataclass
class Outcome:
    transport: str
    status: str  # "ok", "rejected", "deadline", or the unexpected status
    latency_s: float


def texts() -> list[str]:
    with gzip.open(DATA, "rt") as f:
        rows = [json.loads(line) for line in f]
    return [r[side] for r in rows for side in ("chosen", "rejected")]


class Clients:
    def __init__(self, base_url: str, grpc_target: str, corpus: list[str]) -> None:
        self.base_url, self.corpus = base_url, corpus
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
        )
        self.channel = grpc.aio.insecure_channel(grpc_target)
        self.stub = pb_grpc.RewardServiceStub(self.channel)

    async def close(self) -> None:
        await self.http.close()
        await self.channel.close()

    def batch(self) -> list[str]:
        return random.sample(self.corpus, ITEMS)

    async def rest(self, deadline_s: float | None) -> Outcome:
        headers = {"X-Request-Timeout": str(deadline_s)} if deadline_s else {}
        body = {"items": [{"text": t} for t in self.batch()]}
        start = time.perf_counter()
        try:
            async with self.http.post(self.base_url + "/v1/score", json=body, headers=headers) as r:
                payload = await r.read()
                status = r.status
        except aiohttp.ClientError as e:
            return Outcome("rest", f"transport error {type(e).__name__}", 0.0)
        latency = time.perf_counter() - start
        if status == 200 and len(json.loads(payload)["results"]) == ITEMS:
            return Outcome("rest", "ok", latency)
        named = {429: "rejected", 504: "deadline"}.get(status, f"HTTP {status}")
        return Outcome("rest", named, latency)

    async def grpc(self, deadline_s: float | None) -> Outcome:
        request = pb.ScoreRequest(items=[pb.ScoreItem(text=t) for t in self.batch()])
        start = time.perf_counter()
        try:
            resp = await self.stub.Score(request, timeout=deadline_s or 120)
            ok = len(resp.results) == ITEMS
            return Outcome("grpc", "ok" if ok else "wrong count", time.perf_counter() - start)
        except grpc.aio.AioRpcError as e:
            named = {
                grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected",
                grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
            }.get(e.code(), e.code().name)
            return Outcome("grpc", named, time.perf_counter() - start)


async def closed_loop(clients: Clients, seconds: float) -> dict:
    """CONCURRENCY clients, each sending its next request when the last is answered."""
    stop = time.perf_counter() + seconds
    outcomes: list[Outcome] = []

    async def worker(i: int) -> None:
        while time.perf_counter() < stop:
            call = clients.rest if i % 4 else clients.grpc
            outcomes.append(await call(None))

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    wall = time.perf_counter() - start
    ok = [o for o in outcomes if o.status == "ok"]
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "not_ok": len(outcomes) - len(ok),
        "items_per_s": round(len(ok) * ITEMS / wall, 1),
        "requests_per_s": round(len(ok) / wall, 2),
        "p50_ms": pct_ms([o.latency_s for o in ok], 50),
    }


async def open_loop(clients: Clients, rate: float, seconds: float, deadline_s: float) -> dict:
    """Requests arrive at `rate` per second whatever the answers, 3 REST : 1 gRPC."""
    tasks: list[asyncio.Task[Outcome]] = []
    start = time.perf_counter()
    k = 0
    while (now := time.perf_counter() - start) < seconds:
        due = k / rate
        if due > now:
            await asyncio.sleep(due - now)
        call = clients.grpc if k % 4 == 3 else clients.rest
        tasks.append(asyncio.create_task(call(deadline_s)))
        k += 1
    outcomes = await asyncio.gather(*tasks)
    by: dict[str, list[float]] = {}
    for o in outcomes:
        by.setdefault(f"{o.transport} {o.status}", []).append(o.latency_s)
    late = [o for o in outcomes if o.status == "ok" and o.latency_s > deadline_s + LATE_SLACK_S]
    rejected = [o.latency_s for o in outcomes if o.status == "rejected"]
    unexpected = [o for o in outcomes if o.status not in ("ok", "rejected", "deadline")]
    return {
        "offered_per_s": round(rate, 2),
        "sent": len(outcomes),
        "counts": {k: len(v) for k, v in sorted(by.items())},
        "latency_ms": {
            k: {"p50": pct_ms(v, 50), "p95": pct_ms(v, 95), "p99": pct_ms(v, 99)}
            for k, v in sorted(by.items())
        },
        "rejected_p50_ms": pct_ms(rejected, 50),
        "rejected_p99_ms": pct_ms(rejected, 99),
        "late_successes": len(late),
        "unexpected": sorted({o.status for o in unexpected}),
        "unexpected_count": len(unexpected),
    }


def pct_ms(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0] * 1000, 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 1)


async def wait_drained(base_url: str, timeout_s: float = 120) -> None:
    """Until the queue depth metric is back at zero."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            async with s.get(base_url + "/metrics") as r:
                text = await r.text()
            depth = [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("rewardserve_queue_depth{")
            ]
            if depth and max(depth) == 0:
                return
            await asyncio.sleep(0.5)


async def run(args: argparse.Namespace, base_url: str, grpc_target: str, pid: int) -> dict:
    clients = Clients(base_url, grpc_target, texts())
    try:
        await closed_loop(clients, 3)  # warm-up
        before = await closed_loop(clients, args.seconds)
        rss_before = tree_rss_mib(pid)
        rate = args.factor * before["requests_per_s"]
        overload = await open_loop(clients, rate, args.seconds, args.deadline)
        await wait_drained(base_url)
        async with aiohttp.ClientSession() as s, s.get(base_url + "/healthz") as r:
            healthy = r.status == 200
        after = await closed_loop(clients, args.seconds)
    finally:
        await clients.close()
    return {
        "before": before,
        "overload": overload,
        "after": after,
        "healthy_after": healthy,
        "recovery_ratio": round(after["items_per_s"] / before["items_per_s"], 2),
        "rss_mib": {"before": round(rss_before), "after": round(tree_rss_mib(pid))},
    }


def markdown(r: dict, args: argparse.Namespace) -> str:
    o, b, a = r["overload"], r["before"], r["after"]
    lines = [
        f"Overload at {args.factor}x capacity for {args.seconds:.0f} s, deadline "
        f"{args.deadline} s, queue limit {args.max_queue_items} items; {r['machine']}; "
        f"{r['load']} (other jobs share the machine).",
        "",
        "| | before | after |",
        "|---|---:|---:|",
        f"| throughput, items/s | {b['items_per_s']} | {a['items_per_s']} |",
        f"| requests/s | {b['requests_per_s']} | {a['requests_per_s']} |",
        f"| p50 latency, ms | {b['p50_ms']} | {a['p50_ms']} |",
        f"| failed requests | {b['not_ok']} | {a['not_ok']} |",
        "",
        f"During the overload ({o['sent']} requests offered at {o['offered_per_s']}/s):",
        "",
        "| outcome | count | p50 ms | p95 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, n in o["counts"].items():
        lat = o["latency_ms"][k]
        lines.append(f"| {k} | {n} | {lat['p50']} | {lat['p95']} | {lat['p99']} |")
    lines += [
        "",
        f"Successes answered after their deadline: {o['late_successes']}; unexpected "
        f"answers: {o['unexpected_count']} {o['unexpected'] or ''}; server healthy after: "
        f"{r['healthy_after']}; throughput after / before: {r['recovery_ratio']}; RSS "
        f"{r['rss_mib']['before']} -> {r['rss_mib']['after']} MiB.",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--factor", type=float, default=4.0, help="offered load / capacity")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    p.add_argument("--deadline", type=float, default=2.0, help="each overload request's")
    p.add_argument("--max-queue-items", type=int, default=32,
                   help="the server's; the deadline keeps at most offered rate x deadline "
                        "items queued, so a longer queue is never full")  # fmt: skip
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--min-recovery", type=float, default=0.7,
                   help="fail below this throughput ratio after/before (a shared machine "
                        "is noisy: judge the printed ratio on a quiet one)")  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "overload")
    args = p.parse_args()
    if args.max_queue_items < CONCURRENCY * ITEMS:
        p.error(f"--max-queue-items must hold the {CONCURRENCY * ITEMS} items of the "
                "closed-loop clients, or they are rejected while measuring capacity")  # fmt: skip
    load_before = os.getloadavg()[0]
    limits = ("--max-queue-items", str(args.max_queue_items))
    with default_server("transformers", *limits, torch_threads=args.torch_threads) as server:
        assert server.proc is not None
        result = asyncio.run(run(args, server.base_url, server.grpc_target, server.proc.pid))
        result["alive_after"] = server.proc.poll() is None
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result |= {"machine": machine(), "load": load_note(load_before), "args": settings}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.json").write_text(json.dumps(result, indent=2))
    table = markdown(result, args)
    (args.out / "overload.md").write_text(table + "\n")
    print(table)
    o = result["overload"]
    problems = [
        *(["no request was rejected: not overloaded"] if not o["rejected_p50_ms"] else []),
        *([f"{o['late_successes']} successes after their deadline"] if o["late_successes"] else []),
        *([f"unexpected answers: {o['unexpected']}"] if o["unexpected_count"] else []),
        *(["the server died"] if not result["alive_after"] else []),
        *(["unhealthy after the overload"] if not result["healthy_after"] else []),
        *([f"throughput after is {result['recovery_ratio']} of before"]
          if result["recovery_ratio"] < args.min_recovery else []),
    ]  # fmt: skip
    for problem in problems:
        print("FAIL:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
