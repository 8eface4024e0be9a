"""Policy on transformers `generate`: the fallback where vLLM cannot run.

All prompts of a call go through one `generate` with `num_return_sequences=n` (left padding),
in a worker thread of its own so the event loop keeps serving. Candidates of one call finish
together, so they are yielded together at the end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewardserve.policy.base import Generation, Sampling
from rewardserve.registry.loader import LOAD_LOCK

log = logging.getLogger(__name__)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded, as vLLM and OpenAI do); whether one hit."""
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class TransformersPolicy:
    kind = "transformers"
    failure: str | None = None  # nothing here dies for good: errors are per request

    def __init__(self, name: str, folder: Path, max_model_len: int, dtype: str) -> None:
        self.name = name
        self.max_model_len = max_model_len
        # `dtype` is resolved (registry.dtypes): `auto` is bf16 only where that is faster. With
        # AMX this backend's generate ran 1.5-1.7x faster in bf16 than in float32, side by side
        # (benchmarks/bench_dtype.py --transformers); without AMX bf16 is slower.
        weights = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        with LOAD_LOCK:  # see registry.loader
            self.tokenizer: Any = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=weights)
        self.model = model.eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"generate-{name}")

    async def generate(
        self, prompts: Sequence[list[int]], n: int, sampling: Sampling
    ) -> AsyncIterator[Generation]:
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self._executor, self._generate, prompts, n, sampling)
        for gen in outputs:
            yield gen

    @torch.inference_mode()
    def _generate(
        self, prompts: Sequence[list[int]], n: int, sampling: Sampling
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
        )
        eos = tok.eos_token_id
        results = []
        for row, seq in enumerate(out[:, width:].tolist()):
            token_ids, finished = seq, False
            if eos in seq:
                token_ids, finished = seq[: seq.index(eos)], True
            # a sequence that ended early is padded after its eos; pad == eos here
            decoded = tok.decode(token_ids, skip_special_tokens=True)
            text, stopped = cut_at_stop(decoded, sampling.stop)
            if stopped:
                token_ids = tok(text, add_special_tokens=False)["input_ids"]
            reason = "stop" if finished or stopped else "length"
            for copy in range(n // draws):
                index = row % draws + copy
                results.append(Generation(row // draws, index, token_ids, text, reason))
        return results

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
