"""Policy on transformers `generate`: the fallback where vLLM cannot run.

All prompts of a call go through one `generate` with `num_return_sequences=n` (left padding),
in a worker thread of its own so the event loop keeps serving. Candidates of one call finish
together, so they are yielded together at the end. Calls wait for that one thread in a bounded
queue (over it: 429 at once), and a call whose caller is gone (cancelled, past its deadline)
stops at its next decoding step instead of running to max_tokens.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from rewardserve.loading import LOAD_LOCK
from rewardserve.modeling import ensure_pad_token
from rewardserve.policy.base import Generation, Sampling, cut_at_stop
from rewardserve.schemas.errors import Overloaded, Unavailable

log = logging.getLogger(__name__)


class StopWhenSet(StoppingCriteria):
    """Ends every sequence of a generate call once `event` is set (its caller went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class TransformersPolicy:
    kind = "transformers"
    failure: str | None = None  # nothing here dies for good: errors are per request

    def __init__(
        self, name: str, folder: Path, max_model_len: int, dtype: str, max_queued: int = 8
    ) -> None:
        self.name = name
        self.max_model_len = max_model_len
        self.max_queued = max_queued
        # `dtype` is resolved (registry.dtypes): `auto` is bf16 only where that is faster. With
        # AMX this backend's generate ran 1.5-1.7x faster in bf16 than in float32, side by side
        # (benchmarks/bench_dtype.py --transformers); without AMX bf16 is slower.
        weights = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        with LOAD_LOCK:  # see rewardserve.loading
            self.tokenizer: Any = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=weights)
        self.model = model.eval()
        self.tokenizer.padding_side = "left"
        ensure_pad_token(self.tokenizer)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"generate-{name}")
        self._outstanding = 0  # calls running or waiting for the generate thread
        self._lock = threading.Lock()
        self._avg_call_s = 1.0  # running estimate, for Retry-After

    async def generate(
        self, prompts: Sequence[list[int]], n: int, sampling: Sampling
    ) -> AsyncIterator[Generation]:
        with self._lock:
            if self._outstanding > self.max_queued:  # one running, max_queued waiting
                retry = max(1.0, self._outstanding * self._avg_call_s)
                raise Overloaded(
                    f"policy '{self.name}' has {self._outstanding - 1} generate calls waiting "
                    f"(limit {self.max_queued}, --policy-max-queued); retry later",
                    retry_after_s=round(retry, 1),
                )
            self._outstanding += 1
        stop = threading.Event()
        try:
            job = self._executor.submit(self._timed, prompts, n, sampling, stop)
        except RuntimeError:  # shut down
            self._finished(None)
            raise Unavailable(f"policy '{self.name}' is shutting down") from None
        job.add_done_callback(self._finished)
        try:
            outputs = await asyncio.wrap_future(job)
        finally:
            stop.set()  # a cancelled caller: the thread stops at its next step
        for gen in outputs:
            yield gen

    def _finished(self, _: Future | None) -> None:
        with self._lock:
            self._outstanding -= 1

    def _timed(
        self, prompts: Sequence[list[int]], n: int, sampling: Sampling, stop: threading.Event
    ) -> list[Generation]:
        if stop.is_set():  # its caller left while it waited
            return []
        started = time.perf_counter()
        try:
            return self._generate(prompts, n, sampling, stop)
        finally:
            self._avg_call_s = 0.8 * self._avg_call_s + 0.2 * (time.perf_counter() - started)

    @torch.inference_mode()
    def _generate(
        self,
        prompts: Sequence[list[int]],
        n: int,
        sampling: Sampling,
        stop: threading.Event | None = None,
    ) -> list[Generation]:
        tok = self.tokenizer
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)  # one generate thread: the global RNG is ours
        greedy = sampling.temperature == 0
        # Greedy decoding gives one answer per prompt; generate it once, repeat it n times.
        draws = 1 if greedy else n
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=draws,
            pad_token_id=tok.pad_token_id,
            stop_strings=list(sampling.stop) or None,
            tokenizer=tok if sampling.stop else None,
            stopping_criteria=StoppingCriteriaList([StopWhenSet(stop or threading.Event())]),
        )
        ends = {tok.eos_token_id, tok.pad_token_id}
        results = []
        for row, seq in enumerate(out[:, width:].tolist()):
            token_ids, finished = seq, False
            # a sequence that ended early (end of sequence, stop string) is padded after it
            if cut := [i for i, t in enumerate(seq) if t in ends][:1]:
                token_ids, finished = seq[: cut[0]], True
            # The ids stay as generated, up to the token that completed a stop string (where
            # generate stopped), as vLLM reports them: re-tokenizing the cut text could give
            # other ids, and speculative rejection continues a candidate from its ids.
            decoded = tok.decode(token_ids, skip_special_tokens=True)
            text, stopped = cut_at_stop(decoded, sampling.stop)
            reason = "stop" if finished or stopped else "length"
            for copy in range(n // draws):
                index = row % draws + copy
                results.append(Generation(row // draws, index, token_ids, text, reason))
        return results

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
