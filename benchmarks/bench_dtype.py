"""float32 against bfloat16 on this CPU: the measurement behind what `dtype: auto` means.

Reward model (the default, sequence classification, HH texts at max_length 256): both
variants are loaded in one process and timed in alternating rounds (fp32 then bf16, then bf16
then fp32, ...), so a neighbour's load on a shared machine hits both alike; the table gives
the median of the rounds. Accuracy: the bf16 rewards of held-out pairs against fp32 (max and
mean absolute difference, share of pairs whose preferred side is the same).

Policy (--vllm): vLLM generates the default policy (n=8 x 4 prompts x 64 tokens, seeded, the
service's engine settings) in a fresh process per dtype, alternating, --vllm-repeats each.

Policy (--transformers): the transformers backend's generate, same batch, both dtypes in
this process, alternating.

    python benchmarks/bench_dtype.py [--pairs 300] [--repeats 5] [--vllm] [--transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantization import DATA, scorer_for

from rewardserve.config import default_cache_dir
from rewardserve.registry.dtypes import cpu_flags
from rewardserve.training.reward.data import load_pairs, split_pairs

DTYPES = ("float32", "bfloat16")
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a reward model is in two sentences.",
    "Give me three tips for learning to cook.",
    "What is the capital of France, and why is it famous?",
]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine() -> str:
    flags = sorted(cpu_flags() & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, flags {' '.join(flags) or 'none'}, "
        f"load average {load}, torch {torch.__version__} threads {torch.get_num_threads()}"
    )


def bench_reward(model_dir: Path, n_pairs: int, repeats: int, batch: int) -> list[str]:
    report = json.loads((model_dir / "training_report.json").read_text())
    cfg = report["config"]
    _, held = split_pairs(load_pairs(DATA), cfg["eval_fraction"], cfg["seed"], cfg.get("max_pairs"))
    held = held[:n_pairs]
    texts = [t for p in held for t in (p.chosen, p.rejected)]
    root = Path(tempfile.mkdtemp())
    try:
        scorers = {d: scorer_for(model_dir, d, root) for d in DTYPES}
        encoded = scorers["float32"].encode(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        enc = [encoded[i] for i in order]  # length-sorted forwards, as the service runs them

        def run(dtype: str) -> list[float]:
            out: list[float] = []
            for i in range(0, len(enc), batch):
                out += scorers[dtype].forward(enc[i : i + batch])
            rewards = [0.0] * len(texts)
            for pos, i in enumerate(order):
                rewards[i] = out[pos]
            return rewards

        rewards = {d: run(d) for d in DTYPES}  # warm-up, and the rewards compared below
        times: dict[str, list[float]] = {d: [] for d in DTYPES}
        for r in range(repeats):
            for d in DTYPES if r % 2 == 0 else DTYPES[::-1]:
                t0 = time.perf_counter()
                run(d)
                times[d].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root)
    ref, low = rewards["float32"], rewards["bfloat16"]
    diffs = [abs(a - b) for a, b in zip(ref, low, strict=True)]
    pairs = range(len(held))
    agree = statistics.fmean(
        (ref[2 * k] > ref[2 * k + 1]) == (low[2 * k] > low[2 * k + 1]) for k in pairs
    )
    acc = {
        d: statistics.fmean(rewards[d][2 * k] > rewards[d][2 * k + 1] for k in pairs)
        for d in DTYPES
    }
    sps = {d: len(texts) / statistics.median(times[d]) for d in DTYPES}
    lines = [
        f"reward model {model_dir.name}: {len(held)} held-out pairs ({len(texts)} texts, "
        f"{sum(map(len, encoded))} tokens, max_length 256), forwards of {batch}, "
        f"median of {repeats} alternating rounds",
        "| dtype | texts/s | vs fp32 | pairwise acc | same choice as fp32 | max abs diff "
        "| mean abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in DTYPES:
        same = 1.0 if d == "float32" else agree
        mx = 0.0 if d == "float32" else max(diffs)
        mean = 0.0 if d == "float32" else statistics.fmean(diffs)
        lines.append(
            f"| {d} | {sps[d]:.1f} | {sps[d] / sps['float32']:.2f}x | {acc[d]:.3f} | {same:.3f} "
            f"| {mx:.4f} | {mean:.4f} |"
        )
    return lines


def vllm_child(folder: Path, dtype: str) -> None:
    """One engine, one seeded batch; prints generated tokens per second as JSON."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(folder),
        dtype=dtype,
        max_model_len=2048,
        enforce_eager=True,
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
        max_num_batched_tokens=8192,
        seed=0,
    )
    params = SamplingParams(n=8, temperature=1.0, max_tokens=64, min_tokens=64, seed=0)
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    print("RESULT " + json.dumps({"dtype": dtype, "tokens": tokens, "seconds": dt}), flush=True)


def bench_vllm(folder: Path, repeats: int) -> list[str]:
    tps: dict[str, list[float]] = {d: [] for d in DTYPES}
    for r in range(repeats):
        for d in DTYPES if r % 2 == 0 else DTYPES[::-1]:
            cmd = [sys.executable, __file__, "--vllm-child", d, "--policy-dir", str(folder)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"vLLM {d} failed:\n{out.stderr[-3000:]}")
            res = json.loads(line[len("RESULT ") :])
            tps[d].append(res["tokens"] / res["seconds"])
    return _tps_table(
        f"vLLM policy {folder.name}: n=8 x 4 prompts x 64 tokens, median of {repeats} engines each",
        tps,
    )


def bench_transformers(folder: Path, repeats: int) -> list[str]:
    """The transformers policy backend's generate, both dtypes in this process, alternating."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    rendered = [
        tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats
    ]
    batch = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    models = {
        d: AutoModelForCausalLM.from_pretrained(folder, dtype=t).eval() for d, t in dtypes.items()
    }

    def run(d: str, new_tokens: int = 64) -> float:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = models[d].generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_k=None,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                num_return_sequences=8,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
        dt = time.perf_counter() - t0
        return (out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1])) / dt

    for d in DTYPES:
        run(d, new_tokens=4)  # warm-up
    tps: dict[str, list[float]] = {d: [] for d in DTYPES}
    for r in range(repeats):
        for d in DTYPES if r % 2 == 0 else DTYPES[::-1]:
            tps[d].append(run(d))
            print(f"  transformers {d}: {tps[d][-1]:.1f} tokens/s", flush=True)
    return _tps_table(
        f"transformers policy {folder.name}: n=8 x 4 prompts x 64 tokens, median of {repeats}",
        tps,
    )


def _tps_table(title: str, tps: dict[str, list[float]]) -> list[str]:
    lines = [title, "| dtype | tokens/s | vs fp32 | runs |", "|---|---|---|---|"]
    base = statistics.median(tps["float32"])
    for d in DTYPES:
        med = statistics.median(tps[d])
        runs = ", ".join(f"{x:.0f}" for x in tps[d])
        lines.append(f"| {d} | {med:.0f} | {med / base:.2f}x | {runs} |")
    return lines


def main() -> None:
    cache = Path(os.environ.get("REWARDSERVE_CACHE_DIR") or default_cache_dir())
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-dir", type=Path, default=cache / "minilm-hh-harmless")
    ap.add_argument("--policy-dir", type=Path, default=cache / "smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vllm", action="store_true", help="also time vLLM generation")
    ap.add_argument("--vllm-repeats", type=int, default=2)
    ap.add_argument("--transformers", action="store_true", help="also time transformers generate")
    ap.add_argument("--skip-reward", action="store_true", help="policies only")
    ap.add_argument("--vllm-child", choices=DTYPES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_child:
        vllm_child(args.policy_dir, args.vllm_child)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    print("before:", machine(), flush=True)
    if not args.skip_reward:
        for line in bench_reward(args.model_dir, args.pairs, args.repeats, args.batch):
            print(line, flush=True)
    if args.transformers:
        for line in bench_transformers(args.policy_dir, args.vllm_repeats + 1):
            print(line, flush=True)
    if args.vllm:
        for line in bench_vllm(args.policy_dir, args.vllm_repeats):
            print(line, flush=True)
    print("after:", machine(), flush=True)


if __name__ == "__main__":
    main()
