"""`make loadtest`: start the service, run locust headless for a bounded time, stop it.

    python loadtests/run.py --users 16 --run-time 60s

Starts `rewardserve serve` on free ports with the default models (what `make serve` runs),
waits for /readyz, runs loadtests/locustfile.py against it (REST and gRPC users), and stops
the server by its own pid. Writes locust's CSV and HTML plus summary.json / summary.md under
--out. Exits non-zero on any failure; a deliberate 429 / RESOURCE_EXHAUSTED is counted
separately as rejected.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness import (
    ROOT,
    RssSampler,
    default_models_server,
    load_note,
    machine,
    tree_rss_mib,
)

REJECTED = " [rejected]"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--spawn-rate", type=float, default=4)
    p.add_argument("--run-time", default="60s", help="locust's -t: 30s, 2m, ...")
    p.add_argument("--backend", default="vllm", choices=["vllm", "transformers"])
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "loadtest")
    return p.parse_args()


def read_stats(prefix: Path) -> list[dict]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return list(csv.DictReader(f))


def summarize(rows: list[dict]) -> dict:
    endpoints, rejected = [], {}
    for r in rows:
        name = r["Name"]
        if name == "Aggregated":
            continue
        if name.endswith(REJECTED):
            rejected[name.removesuffix(REJECTED)] = int(r["Request Count"])
            continue
        endpoints.append(
            {
                "type": r["Type"],
                "name": name,
                "requests": int(r["Request Count"]),
                "failures": int(r["Failure Count"]),
                "rps": round(float(r["Requests/s"]), 2),
                "p50_ms": float(r["50%"]),
                "p95_ms": float(r["95%"]),
                "p99_ms": float(r["99%"]),
            }
        )
    for e in endpoints:
        e["rejected"] = rejected.pop(e["name"], 0)
    # an endpoint whose every request was rejected still gets a row
    endpoints += [
        {"type": "", "name": n, "requests": 0, "failures": 0, "rps": 0.0, "p50_ms": 0.0,
         "p95_ms": 0.0, "p99_ms": 0.0, "rejected": c}
        for n, c in rejected.items()
    ]  # fmt: skip
    total = next(r for r in rows if r["Name"] == "Aggregated")
    return {
        "endpoints": endpoints,
        "total_rps": round(float(total["Requests/s"]), 2),
        "total_requests": int(total["Request Count"]),
        "failures": sum(e["failures"] for e in endpoints),
        "rejected": sum(e["rejected"] for e in endpoints),
    }


def markdown(s: dict) -> str:
    lines = [
        f"{s['users']} users for {s['run_time']} ({s['backend']} policy) on {s['machine']}; "
        f"{s['load']} (other jobs share the machine); {s['total_rps']} req/s in all, "
        f"{s['failures']} failures, {s['rejected']} rejected (429 / RESOURCE_EXHAUSTED).",
        "",
        "| endpoint | requests | req/s | p50 ms | p95 ms | p99 ms | failures | rejected |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in s["endpoints"]:
        lines.append(
            f"| {e['type']} {e['name']} | {e['requests']} | {e['rps']} | {e['p50_ms']:.0f} "
            f"| {e['p95_ms']:.0f} | {e['p99_ms']:.0f} | {e['failures']} | {e['rejected']} |"
        )
    rss = s["rss_mib"]
    log = "a clean log" if s["server_log_clean"] else "a traceback in its log"
    lines += [
        "",
        f"Server RSS (process tree): {rss['start']:.0f} MiB at start, {rss['end']:.0f} MiB at "
        f"the end, {rss['max']:.0f} MiB at most. On SIGTERM it exited "
        f"{s['server_exit_code']} with {log}.",
    ]
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / "loadtest"
    load_before = os.getloadavg()[0]
    with default_models_server(args.backend) as server:
        assert server.proc is not None
        rss_start = tree_rss_mib(server.proc.pid)
        sampler = RssSampler(server.proc.pid)
        sampler.start()
        env = {**os.environ, "REWARDSERVE_GRPC_TARGET": server.grpc_target}
        locust = [
            str(Path(sys.executable).with_name("locust")),
            "-f", str(ROOT / "loadtests" / "locustfile.py"),
            "--headless", "--only-summary",
            "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time,
            "--stop-timeout", "30",
            "--host", server.base_url,
            "--csv", str(prefix), "--html", f"{prefix}.html",
        ]  # fmt: skip
        started = time.monotonic()
        rc = subprocess.run(locust, env=env, cwd=ROOT / "loadtests").returncode
        wall = time.monotonic() - started
        samples = sampler.stop()
        rss_end = tree_rss_mib(server.proc.pid)
        alive = server.proc.poll() is None
        # SIGTERM: in-flight work drains, the engines close, the process exits 0
        exit_code = server.stop()
        clean_stop = exit_code == 0 and "Traceback" not in server.log_tail(10**7)
    summary = {
        "users": args.users,
        "run_time": args.run_time,
        "backend": args.backend,
        "wall_s": round(wall, 1),
        "machine": machine(),
        "load": load_note(load_before),
        "locust_exit_code": rc,
        "server_alive_at_end": alive,
        "server_exit_code": exit_code,
        "server_log_clean": clean_stop,
        **summarize(read_stats(prefix)),
        "rss_mib": {
            "start": rss_start,
            "end": rss_end,
            "max": max(rss_end, *(mib for _, mib in samples)),
        },
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = markdown(summary)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    ok = rc == 0 and summary["failures"] == 0 and alive
    if not ok:
        print(f"loadtest FAILED (locust exit {rc}, {summary['failures']} failures, "
              f"server alive: {alive})", file=sys.stderr)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
