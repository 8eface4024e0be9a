"""A PPO job through the jobs API, measured against the same config run by the CLI in process.

Starts `rewardserve serve` on the default models (free ports, a private data directory and a
copy of models/ so the exported policy lands nowhere it stays), puts a steady light /v1/score
load on it (--clients threads, one request then --think-s pause each) and reports:

  /v1/score p50/p99     idle, and while one PPO job runs (from its first step to its last)
                        target: p99 with the job <= 2 x idle
  POST -> first step    from the POST /v1/jobs call to the job's first step event (SSE): the
                        worker's start, its model loads, the first rollout and update
  s/step                median of the job's time/step_s (steps after the first) against the
                        same config run by `rewardserve ppo` in process, with the service stopped
                        and the same torch threads
  end -> servable       from the job's last step to its `succeeded` status (export, held-out
                        evaluation, the service loading the new policy), then to the first
                        /v1/best-of-n answered by that policy

Results go to bench-results/jobs-<date>.{md,json} with the CPU and versions. It takes the whole
machine: run it on a quiet one (`make bench` runs it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_bon import load_prompts, write_results  # noqa: E402
from bench_ppo import CACHE, POLICY, REWARD_MODEL, ScoreLoad, machine, pct_ms  # noqa: E402

from servers import RewardServer  # noqa: E402


def job_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "policy": POLICY,
        "reward_model": REWARD_MODEL,
        "advantage_estimator": args.estimator,
        "total_steps": args.steps,
        "batch_size": args.batch,
        "samples_per_prompt": args.samples,
        "mini_batch_size": args.batch * args.samples,
        "max_new_tokens": args.max_new_tokens,
        "learning_rate": 1e-6,
        "seed": 1234,
        "rollout_backend": args.rollout_backend,
        "dtype": "float32",
        "eval_fraction": 0.0,
        "eval_prompts": [{"messages": m} for m in load_prompts(2, max_chars=200, seed=99)],
        "eval_max_prompts": 2,
    }


class EventWatcher(threading.Thread):
    """Follows GET /v1/jobs/{id}/events and keeps (arrival time, event) pairs."""

    def __init__(self, base_url: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{base_url}/v1/jobs/{job_id}/events"
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        last = 0
        while not self.done.is_set():
            try:
                headers = {"Last-Event-ID": str(last)} if last else {}
                with httpx.stream(
                    "GET", self.url, headers=headers, timeout=None, trust_env=False
                ) as r:
                    for line in r.iter_lines():
                        if not line.startswith("data:"):
                            continue
                        event = json.loads(line[5:])
                        last = event["id"]
                        self.events.append((time.perf_counter(), event))
                        data = event["data"]
                        if event["type"] == "status" and data.get("status") in (
                            "succeeded", "failed", "cancelled",
                        ):  # fmt: skip
                            self.done.set()
                            return
            except httpx.HTTPError:
                time.sleep(0.5)

    def first(self, kind: str, **match: Any) -> float | None:
        for t, e in self.events:
            if e["type"] == kind and all(e["data"].get(k) == v for k, v in match.items()):
                return t
        return None

    def last(self, kind: str) -> float | None:
        times = [t for t, e in self.events if e["type"] == kind]
        return times[-1] if times else None


def step_seconds(metrics: list[dict[str, Any]]) -> float | None:
    steps = [m["time/step_s"] for m in metrics[1:] if m.get("time/step_s")]
    return statistics.median(steps) if steps else None


def run_cli(config: dict[str, Any], repo: Path, threads: int, timeout_s: float) -> list[dict]:
    """The same config, `rewardserve ppo` in process (rewards from its own scorer)."""
    with tempfile.TemporaryDirectory(prefix="bench-jobs-cli-") as tmp:
        cfg = dict(config, model_repository=str(repo), cache_dir=str(CACHE),
                   torch_threads=threads, prompts=config["prompts"],
                   export_name=f"bench-cli-{int(time.time())}")  # fmt: skip
        path = Path(tmp) / "ppo.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(threads)}
        subprocess.run(
            [sys.executable, "-m", "rewardserve.cli", "ppo", str(path), "--output", tmp],
            check=True, env=env, timeout=timeout_s, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--estimator", default="grpo", choices=["gae", "rloo", "grpo"])
    p.add_argument("--rollout-backend", default="transformers",
                   choices=["auto", "transformers", "vllm"])  # fmt: skip
    p.add_argument(
        "--policy-backend",
        default="transformers",
        help="the service's policy backend (serving the exported policy)",
    )
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--think-s", type=float, default=0.2)
    p.add_argument("--idle-s", type=float, default=30.0)
    p.add_argument("--server-threads", type=int, default=1)
    p.add_argument("--job-threads", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=1800.0)
    p.add_argument("--no-cli", action="store_true", help="skip the in-process CLI baseline")
    args = p.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="bench-jobs-")
    repo = Path(tmp.name) / "models"
    shutil.copytree(ROOT / "models", repo, ignore=shutil.ignore_patterns("*-ppo-*"))
    data_dir = Path(tmp.name) / "data"
    config = job_config(args)
    prompts = [{"messages": m} for m in load_prompts(args.steps * args.batch, seed=1234)]
    before = os.getloadavg()[0]
    server = RewardServer(
        repo,
        cache_dir=CACHE,
        torch_threads=args.server_threads,
        startup_timeout_s=300,
        extra_args=[
            "--data-dir",
            str(data_dir),
            "--policy-backend",
            args.policy_backend,
            "--job-torch-threads",
            str(args.job_threads),
        ],
    )
    out: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    with server:
        http = server.http()
        load = ScoreLoad(server.base_url, args.clients, args.think_s).start()
        time.sleep(3)  # the first requests warm the server
        idle_start = time.perf_counter()
        time.sleep(args.idle_s)
        idle_stop = time.perf_counter()

        posted = time.perf_counter()
        r = http.post("/v1/jobs", json={"type": "ppo", "config": config, "prompts": prompts})
        r.raise_for_status()
        job = r.json()
        watcher = EventWatcher(server.base_url, job["id"])
        watcher.start()
        watcher.done.wait(args.timeout_s)
        load.stop()
        job = http.get(f"/v1/jobs/{job['id']}").json()
        out["job"] = job
        if job["status"] != "succeeded":
            print(json.dumps(job, indent=2), file=sys.stderr)
            print(http.get(f"/v1/jobs/{job['id']}/logs").text[-4000:], file=sys.stderr)
            return 1
        metrics = http.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
        first_step = watcher.first("step")
        last_step = watcher.last("step")
        succeeded = watcher.first("status", status="succeeded")
        finished = next(
            (t for t, e in watcher.events
             if e["type"] == "log" and "worker finished" in e["data"].get("message", "")),
            None,
        )  # fmt: skip
        assert first_step and last_step and succeeded and finished
        policy = job["result"]["policy"]
        bon = http.post(
            "/v1/best-of-n",
            json={"policy": policy, "prompt": "How do I stay calm?", "n": 2, "max_tokens": 8},
            timeout=300,
        )
        servable = time.perf_counter()
        bon.raise_for_status()

    idle = load.window(idle_start, idle_stop)
    busy = load.window(first_step, last_step)
    p99_idle, p99_busy = pct_ms(idle, 99), pct_ms(busy, 99)
    ratio = p99_busy / p99_idle if p99_idle and p99_busy else None
    job_s = step_seconds(metrics)
    cli_s = None
    if not args.no_cli:
        cli_metrics = run_cli(config | {"prompts": prompts}, repo, args.job_threads,
                              args.timeout_s)  # fmt: skip
        cli_s = step_seconds(cli_metrics)
        out["cli_metrics"] = cli_metrics
    tmp.cleanup()

    def fmt(v: float | None, digits: int = 2) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    lines = [
        f"PPO job: {args.estimator}, {args.steps} steps of {args.batch}x{args.samples} sequences, "
        f"{args.max_new_tokens} new tokens, {args.rollout_backend} rollouts, worker on "
        f"{args.job_threads} torch thread(s) at nice 10; server on {args.server_threads}; "
        f"/v1/score load: {args.clients} clients, {args.think_s} s think time",
        "",
        "| measure | value |",
        "|---|---|",
        f"| /v1/score p50 / p99 idle (ms) | {pct_ms(idle, 50)} / {p99_idle} ({len(idle)} req) |",
        f"| /v1/score p50 / p99 with the job (ms) | {pct_ms(busy, 50)} / {p99_busy} "
        f"({len(busy)} req) |",
        f"| p99 with the job / idle | {fmt(ratio)}x (target <= 2x) |",
        f"| POST /v1/jobs -> first step (s) | {fmt(first_step - posted, 1)} |",
        f"| s/step: job through the service | {fmt(job_s)} |",
        f"| s/step: same config, CLI in process | {fmt(cli_s)} |",
        f"| job / CLI | {fmt(job_s / cli_s if job_s and cli_s else None)}x |",
        f"| last step -> worker done (export, held-out eval) (s) | "
        f"{fmt(finished - last_step, 1)} |",
        f"| worker done -> succeeded (the service loads the policy) (s) | "
        f"{fmt(succeeded - finished, 1)} |",
        f"| succeeded -> first Best-of-N answered (s) | {fmt(servable - succeeded, 1)} |",
        "",
        f"score errors {load.errors}; load average {before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; CPU {out['machine']['cpu']}",
    ]
    out.update(idle_ms=[s * 1000 for s in idle], busy_ms=[s * 1000 for s in busy],
               p99_ratio=ratio, job_step_s=job_s, cli_step_s=cli_s,
               first_step_s=first_step - posted, export_eval_s=finished - last_step,
               load_policy_s=succeeded - finished,
               succeeded_to_servable_s=servable - succeeded)  # fmt: skip
    write_results(f"jobs-{dt.date.today().isoformat()}", lines, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
