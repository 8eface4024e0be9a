"""Policy on a remote OpenAI-compatible completions server (`vllm serve` on a GPU box).

One `/completions` request per prompt with `n` samples, the prompt sent as token ids so the
remote model sees exactly what the local tokenizer and chat template produced, and the
generated token ids asked back (`return_token_ids`) so they are exactly what it sampled.
Transport errors, 429 and 5xx are retried with exponential backoff; a 4xx is the caller's
mistake and is passed on as such.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer

from rewardserve.loading import LOAD_LOCK
from rewardserve.policy.base import Generation, Sampling, derive_seed
from rewardserve.schemas.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}


class OpenAIPolicy:
    kind = "openai"
    failure: str | None = None  # nothing here dies for good: errors are per request

    def __init__(
        self,
        name: str,
        tokenizer_folder: Path,
        max_model_len: int,
        base_url: str,
        remote_model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        self.name = name
        self.max_model_len = max_model_len
        with LOAD_LOCK:  # see rewardserve.loading
            self.tokenizer: Any = AutoTokenizer.from_pretrained(tokenizer_folder)
        self.remote_model = remote_model
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout_s, headers=headers, trust_env=False
        )

    async def generate(
        self, prompts: Sequence[list[int]], n: int, sampling: Sampling
    ) -> AsyncIterator[Generation]:
        tasks = [
            asyncio.create_task(self._complete(p, list(ids), n, sampling))
            for p, ids in enumerate(prompts)
        ]
        try:
            for next_done in asyncio.as_completed(tasks):
                for gen in await next_done:
                    yield gen
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _complete(
        self, p: int, prompt: list[int], n: int, sampling: Sampling
    ) -> list[Generation]:
        body: dict[str, Any] = {
            "model": self.remote_model,
            "prompt": prompt,
            "n": n,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            # vLLM's server returns each choice's generated ids (`token_ids`); servers that do
            # not know the field ignore it
            "return_token_ids": True,
        }
        if (seed := derive_seed(sampling.seed, p)) is not None:
            body["seed"] = seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        data = await self._post("/completions", body)
        gens = []
        for choice in data["choices"]:
            text = choice.get("text") or ""
            ids = choice.get("token_ids")
            if ids is None:
                # No ids from this server: re-tokenizing its text is the only way left, and it
                # can give other ids than the ones sampled (a multi-byte character split across
                # tokens, a merge the sampler did not make), so a speculative candidate
                # continued from them may drift from what the remote generated.
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            reason = "length" if choice.get("finish_reason") == "length" else "stop"
            gens.append(Generation(p, int(choice["index"]), ids, text, reason))
        return gens

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                r = await self.client.post(path, json=body)
            except httpx.TransportError as e:
                if last:
                    raise Unavailable(
                        f"policy server {self.client.base_url} unreachable: {e!r}"
                    ) from None
            else:
                if r.status_code < 400:
                    return r.json()
                if r.status_code not in RETRY_STATUS:
                    raise InvalidArgument(
                        f"policy server refused the request ({r.status_code}): {r.text[:500]}"
                    )
                if last:
                    raise Unavailable(
                        f"policy server {self.client.base_url} answered {r.status_code} "
                        f"{self.max_retries + 1} times: {r.text[:300]}"
                    )
            await asyncio.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.client.aclose()
