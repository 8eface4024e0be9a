"""The transformers policy backend on a tiny real causal LM: its bounded queue and how a call
whose caller went away stops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from builders import build_tiny_policy
from rewardserve.policy.base import Sampling
from rewardserve.policy.hf_backend import TransformersPolicy
from rewardserve.schemas.errors import Overloaded

# Thousands of steps of n=4 at tens of milliseconds each: minutes if nothing stops it.
LONG = Sampling(max_tokens=6000, seed=1)
SHORT = Sampling(max_tokens=2, seed=1)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def policy(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TransformersPolicy]:
    folder = build_tiny_policy(tmp_path_factory.mktemp("hf") / "models")
    p = TransformersPolicy("tiny", folder / "weights", 8192, "float32", max_queued=1)
    yield p
    await p.close()


async def drain(policy: TransformersPolicy, sampling: Sampling, n: int = 4) -> list:
    prompt = policy.tokenizer("hello there")["input_ids"]
    return [g async for g in policy.generate([prompt], n, sampling)]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_cancelled_call_stops_its_generation(policy: TransformersPolicy) -> None:
    slow = asyncio.create_task(drain(policy, LONG))
    await asyncio.sleep(0.5)  # it runs in the generate thread now
    slow.cancel()
    # The next call waits for the one generate thread: it can only finish this soon if the
    # cancelled generation stopped at its next step rather than at max_tokens.
    gens = await asyncio.wait_for(drain(policy, SHORT), timeout=60)
    assert len(gens) == 4 and all(len(g.token_ids) == 2 for g in gens)
    assert policy._outstanding == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_over_the_queue_bound_is_refused_at_once(policy: TransformersPolicy) -> None:
    running = asyncio.create_task(drain(policy, LONG))
    waiting = asyncio.create_task(drain(policy, SHORT))
    await asyncio.sleep(0.1)  # both admitted: one running, one waiting (max_queued=1)
    with pytest.raises(Overloaded) as info:
        await drain(policy, SHORT)
    assert "--policy-max-queued" in info.value.message and info.value.retry_after_s >= 1
    running.cancel()
    assert len(await asyncio.wait_for(waiting, timeout=60)) == 4
    await asyncio.gather(running, return_exceptions=True)
    assert len(await drain(policy, SHORT)) == 4  # and it serves again


def test_messages_for_a_policy_without_a_chat_template_are_refused_naming_the_field(
    policy: TransformersPolicy,
) -> None:
    """The MiniLM tokenizer has no chat template: Best-of-N must say so (400 on the field),
    not fail inside transformers (a 500 on REST, UNKNOWN on gRPC)."""
    from rewardserve.bon.service import policy_prompt_ids
    from rewardserve.schemas.bon import PromptInput
    from rewardserve.schemas.errors import InvalidArgument

    item = PromptInput.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(InvalidArgument) as info:
        policy_prompt_ids(policy, item, "prompts.3.messages")
    assert info.value.field == "prompts.3.messages"
    assert "chat template" in info.value.message
    assert (
        policy_prompt_ids(policy, PromptInput(prompt="hi")) == policy.tokenizer("hi")["input_ids"]
    )
