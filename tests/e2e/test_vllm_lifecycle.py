"""The vLLM policy's request lifecycle on the real engine: every exit path of a generate call
(error in one prompt, cancellation, a deadline, a consumer that stops reading) leaves nothing
running in the engine. Read through vLLM's own count of unfinished requests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from rewardserve.policy.base import Sampling

LONG = Sampling(max_tokens=1500, seed=3)  # far longer than any test waits


def prompt_ids(policy: Any, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    ids = policy.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


async def drain(policy: Any, prompts: list[list[int]], n: int, sampling: Sampling) -> list:
    return [g async for g in policy.generate(prompts, n, sampling)]


async def until_running(policy: Any, count: int) -> None:
    deadline = time.monotonic() + 120
    while policy.unfinished_requests < count:
        assert time.monotonic() < deadline, "the engine never started the requests"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_failing_prompt_aborts_its_siblings(vllm_policy: Any) -> None:
    good = [prompt_ids(vllm_policy, "Tell me a long story."), prompt_ids(vllm_policy, "Hi")]
    too_long = [good[0][0]] * 3000  # over the engine's 2,048-token context: vLLM refuses it
    with pytest.raises(Exception):  # noqa: B017 - whatever vLLM raises; the point is after
        await drain(vllm_policy, [*good, too_long], 4, LONG)
    assert vllm_policy.unfinished_requests == 0
    assert vllm_policy.failure is None


@pytest.mark.asyncio(loop_scope="session")
async def test_cancel_and_deadline_abort_every_prompt(vllm_policy: Any) -> None:
    prompts = [prompt_ids(vllm_policy, t) for t in ("Tell me a story.", "Name a city.", "Hi")]
    task = asyncio.create_task(drain(vllm_policy, prompts, 4, LONG))
    await until_running(vllm_policy, 3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert vllm_policy.unfinished_requests == 0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(2):
            await drain(vllm_policy, prompts, 4, LONG)
    assert vllm_policy.unfinished_requests == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_a_consumer_that_stops_reading_aborts_the_rest(vllm_policy: Any) -> None:
    prompts = [prompt_ids(vllm_policy, "Write one sentence."), prompt_ids(vllm_policy, "Hi")]
    # a stop string ends some candidates early while the others run on
    sampling = Sampling(max_tokens=1500, seed=5, stop=(".",))
    gens = vllm_policy.generate(prompts, 8, sampling)
    first = await anext(gens)
    assert first.finish_reason in ("stop", "length")
    await gens.aclose()
    assert vllm_policy.unfinished_requests == 0
    # and the engine serves on
    (gen,) = await drain(vllm_policy, prompts[:1], 1, Sampling(max_tokens=4, seed=1))
    assert len(gen.token_ids) == 4 or gen.finish_reason == "stop"
