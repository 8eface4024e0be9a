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

from rewardserve.policy.base import Generation, Sampling, cut_at_stop
from rewardserve.registry.loader import LOAD_LOCK

log = logging.getLogger(__name__)


class TransformersPolicy:
    kind = "transformers"
    failure: str | None = None  # nothing here dies for good: errors are per request

    def __init__(self, name: str, folder: Path, max_model_len: int, dtype: str) -> None:
        self.name = name
        self.max_model_len = max_model_len
        # This backend runs on the CPU. bf16 matmuls have no fast path on CPUs without AMX (the
        # reward model ran 1.5x slower in bf16 on AVX-512), so the weights load as float32
        # whatever the manifest's dtype, which is vLLM's.
        del dtype
        with LOAD_LOCK:  # see registry.loader
            self.tokenizer: Any = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
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
