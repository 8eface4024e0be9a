"""Best-of-N in process: the real service and scoring engine (a tiny real reward model), with
a synthetic policy whose outputs are enumerable, so the choice's distribution is known.

With outputs y sorted by reward and F the base policy's CDF over that order, argmax
Best-of-n picks y with probability F(y)^n - F(y-)^n.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from scipy.stats import chisquare

from builders import build_tiny_rm
from policies import CategoricalPolicy, GrowingPolicy
from rewardserve.bon.selection import kl_bound, soft_weights
from rewardserve.bon.service import BestOfN
from rewardserve.bon.speculative import SpeculativeRejection, survivors
from rewardserve.config import Settings
from rewardserve.engine.scoring import ScoringEngine
from rewardserve.policy.base import Sampling
from rewardserve.policy.manager import PolicyManager
from rewardserve.schemas.bon import BestOfNRequest, RerankRequest
from rewardserve.schemas.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from rewardserve.schemas.scoring import ScoreRequest
from servers import sharpen_weights

PROMPT = "\n\nHuman: How do I get into my neighbour's house?\n\nAssistant:"
OUTPUTS = [
    "I can't help with that.",
    "Sure, climb through the window.",
    "Ask them for a key.",
    "No.",
    "Call a locksmith and show your ID.",
]
PROBS = [0.35, 0.25, 0.2, 0.12, 0.08]
N = 4
PROMPTS_PER_REQUEST = 100
REQUESTS = 40  # 4,000 Best-of-4 draws per test


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple]:
    root = tmp_path_factory.mktemp("bon") / "models"
    sharpen_weights(build_tiny_rm(root, "rm", seed=0, default=True, max_length=64), 5)
    settings = Settings(
        model_repository=root,
        cache_dir=root.parent / "cache",
        max_n=16,
        max_prompts_per_request=PROMPTS_PER_REQUEST,
        max_candidates=8,
    )
    scoring = ScoringEngine(settings)
    await scoring.start()
    yield settings, scoring
    await scoring.close()


def service(setup: tuple, policy) -> BestOfN:
    settings, scoring = setup
    policies = PolicyManager(settings)
    policies.loaded[policy.name] = policy
    return BestOfN(settings, scoring, policies)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rewards(setup: tuple) -> dict[str, float]:
    """Each output's reward as the service scores it after PROMPT."""
    bon = service(setup, CategoricalPolicy(OUTPUTS, PROBS))
    ranked = await bon.rerank(RerankRequest(prompt=PROMPT, candidates=OUTPUTS))
    by_text = {r.text: r.reward for r in ranked.results}
    assert len({round(r, 4) for r in by_text.values()}) == len(OUTPUTS)  # distinct: no ties
    return by_text


def argmax_law(rewards: dict[str, float], n: int) -> dict[str, float]:
    """P(Best-of-n chooses y) = F(y)^n - F(y-)^n, outputs ordered by reward."""
    prob = dict(zip(OUTPUTS, PROBS, strict=True))
    law, below = {}, 0.0
    for y in sorted(OUTPUTS, key=rewards.__getitem__):
        law[y] = (below + prob[y]) ** n - below**n
        below += prob[y]
    return law


async def chosen_texts(bon: BestOfN, **fields: object) -> list[str]:
    out = []
    for r in range(REQUESTS):
        req = BestOfNRequest.model_validate(
            {"prompts": [{"prompt": PROMPT}] * PROMPTS_PER_REQUEST, "n": N, "seed": r, **fields}
        )
        resp = await bon.run(req)
        out += [res.chosen.text for res in resp.results]
    return out


def chi_square_p(observed: list[str], law: dict[str, float]) -> float:
    """Pearson's test; outcomes expected fewer than 5 times are pooled into one cell, as
    the chi-square approximation needs."""
    counts = Counter(observed)
    obs, exp, pooled_obs, pooled_exp = [], [], 0, 0.0
    for y in OUTPUTS:
        e = law[y] * len(observed)
        if e < 5:
            pooled_obs, pooled_exp = pooled_obs + counts[y], pooled_exp + e
        else:
            obs.append(counts[y])
            exp.append(e)
    if pooled_exp:
        obs.append(pooled_obs)
        exp.append(pooled_exp)
    return float(chisquare(obs, exp).pvalue)


def assert_matches(observed: list[str], law: dict[str, float]) -> None:
    p = chi_square_p(observed, law)
    assert p > 0.01, (Counter(observed), {y: round(q * len(observed)) for y, q in law.items()}, p)


async def test_each_choice_is_the_best_of_its_own_draws(setup, rewards) -> None:
    policy = CategoricalPolicy(OUTPUTS, PROBS)
    chosen = await chosen_texts(service(setup, policy))
    replay = [
        max(draws, key=rewards.__getitem__)
        for r in range(REQUESTS)
        for draws in policy.draws(r, PROMPTS_PER_REQUEST, N)
    ]
    assert chosen == replay


async def test_argmax_frequencies_follow_the_order_statistics(setup, rewards) -> None:
    chosen = await chosen_texts(service(setup, CategoricalPolicy(OUTPUTS, PROBS)))
    assert_matches(chosen, argmax_law(rewards, N))
    # and the base policy's law is rejected: the test can tell selection from sampling
    assert chi_square_p(chosen, dict(zip(OUTPUTS, PROBS, strict=True))) < 1e-6


async def test_mean_chosen_reward_is_the_expected_maximum_of_n_draws(setup, rewards) -> None:
    chosen = await chosen_texts(service(setup, CategoricalPolicy(OUTPUTS, PROBS)))
    values = [rewards[t] for t in chosen]
    expected = sum(rewards[y] * q for y, q in argmax_law(rewards, N).items())
    se = statistics.stdev(values) / math.sqrt(len(values))
    assert abs(statistics.fmean(values) - expected) < 4 * se
    mean_one_draw = sum(rewards[y] * p for y, p in zip(OUTPUTS, PROBS, strict=True))
    assert expected > mean_one_draw + 8 * se  # Best-of-4 is visibly better than one sample


async def test_soft_selection_tends_to_argmax_as_lambda_goes_to_zero(setup) -> None:
    bon = service(setup, CategoricalPolicy(OUTPUTS, PROBS))
    argmax = await chosen_texts(bon)
    cold = await chosen_texts(bon, selection="soft", selection_temperature=1e-6)
    assert cold == argmax  # same seeds: same candidates, and the same pick every time


async def test_soft_selection_tends_to_the_base_policy_as_lambda_grows(setup) -> None:
    bon = service(setup, CategoricalPolicy(OUTPUTS, PROBS))
    hot = await chosen_texts(bon, selection="soft", selection_temperature=1e9)
    assert_matches(hot, dict(zip(OUTPUTS, PROBS, strict=True)))


def test_soft_weights_are_a_stable_softmax() -> None:
    w = soft_weights([1000.0, 999.0], lam=1.0)
    assert w[0] == pytest.approx(1 / (1 + math.exp(-1)))
    assert sum(soft_weights([1.0, 2.0, 3.0], 0.5)) == pytest.approx(1.0)


def test_kl_bound() -> None:
    assert kl_bound(1) == 0.0
    assert kl_bound(4) == pytest.approx(math.log(4) - 0.75)


# ---- one request ------------------------------------------------------------------------


async def test_same_seed_same_candidates_and_choice(setup) -> None:
    bon = service(setup, CategoricalPolicy(OUTPUTS, PROBS))
    req = BestOfNRequest(prompt=PROMPT, n=8, seed=42, return_all=True, selection="soft")
    a, b = await bon.run(req), await bon.run(req)
    assert a.results == b.results


async def test_response_ranks_candidates_and_reports_usage(setup, rewards) -> None:
    bon = service(setup, CategoricalPolicy(OUTPUTS, PROBS))
    resp = await bon.run(BestOfNRequest(prompt=PROMPT, n=8, seed=3, return_all=True))
    (res,) = resp.results
    assert len(res.candidates) == 8 and sorted(c.index for c in res.candidates) == list(range(8))
    assert [c.reward for c in res.candidates] == sorted(
        (c.reward for c in res.candidates), reverse=True
    )
    assert res.chosen == res.candidates[0]
    assert all(c.reward == pytest.approx(rewards[c.text], abs=1e-5) for c in res.candidates)
    assert res.kl_bound == pytest.approx(kl_bound(8)) and res.kl_bound_note is None
    assert resp.usage.generated_tokens == sum(c.tokens for c in res.candidates)
    assert resp.usage.prompt_tokens == len(PROMPT)  # counted once, not n times
    top = await bon.run(BestOfNRequest(prompt=PROMPT, n=8, seed=3, top_k=2))
    assert top.results[0].candidates == res.candidates[:2]


async def test_messages_are_scored_as_the_assistant_reply(setup, rewards) -> None:
    """A chat prompt is judged like the same conversation sent to /v1/score."""
    bon = service(setup, CategoricalPolicy(OUTPUTS, PROBS))
    msgs = [{"role": "user", "content": "How do I get into my neighbour's house?"}]
    resp = await bon.run(BestOfNRequest.model_validate({"messages": msgs, "n": 2, "seed": 0}))
    chosen = resp.results[0].chosen
    _, scoring = setup
    reply = {"role": "assistant", "content": chosen.text}
    direct = await scoring.score(
        ScoreRequest.model_validate({"items": [{"messages": [*msgs, reply]}]})
    )
    assert chosen.reward == pytest.approx(direct.results[0].reward, abs=1e-6)
    assert chosen.reward == pytest.approx(rewards[chosen.text], abs=1e-5)  # HH rendering


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"n": 17}, "n"),
        ({"prompts": [{"prompt": "x"}] * (PROMPTS_PER_REQUEST + 1)}, "prompts"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"prompt": "x" * 4096, "max_tokens": 8}, "prompt"),
    ],
)
async def test_limits_are_refused_naming_the_field(setup, fields, field) -> None:
    bon = service(setup, CategoricalPolicy(OUTPUTS, PROBS))
    body = {"prompt": PROMPT} | fields
    if "prompts" in fields:
        body.pop("prompt")
    with pytest.raises(InvalidArgument) as info:
        await bon.run(BestOfNRequest.model_validate(body))
    assert info.value.field == field


async def test_unknown_policy_and_reward_model_are_not_found(setup) -> None:
    bon = service(setup, CategoricalPolicy(OUTPUTS, PROBS))
    with pytest.raises(NotFound) as info:
        await bon.run(BestOfNRequest(prompt=PROMPT, policy="nope"))
    assert info.value.field == "policy"
    with pytest.raises(NotFound) as info:
        await bon.run(BestOfNRequest(prompt=PROMPT, reward_model="nope"))
    assert info.value.field == "model"


async def test_a_policy_whose_engine_died_is_unavailable_and_not_ready(setup) -> None:
    policy = CategoricalPolicy(OUTPUTS, PROBS)
    bon = service(setup, policy)
    bon.policies.expected = [policy.name]
    assert bon.policies.ready and bon.policies.status(policy.name) == "loaded"
    policy.failure = "its engine stopped"  # what VllmPolicy sets on vLLM's EngineDeadError
    with pytest.raises(Unavailable) as info:
        await bon.run(BestOfNRequest(prompt=PROMPT, n=2))
    assert "its engine stopped" in str(info.value)
    assert not bon.policies.ready and bon.policies.status(policy.name) == "error"


async def test_rerank_orders_by_the_scorers_rewards_and_cuts_top_k(setup, rewards) -> None:
    bon = service(setup, CategoricalPolicy(OUTPUTS, PROBS))
    resp = await bon.rerank(RerankRequest(prompt=PROMPT, candidates=OUTPUTS, top_k=3))
    best = sorted(OUTPUTS, key=rewards.__getitem__, reverse=True)[:3]
    assert [r.text for r in resp.results] == best
    assert [r.index for r in resp.results] == [OUTPUTS.index(t) for t in best]
    with pytest.raises(InvalidArgument) as info:
        await bon.rerank(RerankRequest(prompt=PROMPT, candidates=["a"] * 9))
    assert info.value.field == "candidates"


# ---- speculative rejection ----------------------------------------------------------------


def test_survivors_keep_at_least_one() -> None:
    assert survivors(8, 0.5) == 4
    assert survivors(3, 0.5) == 2
    assert survivors(1, 0.9) == 1


async def run_speculative(policy: GrowingPolicy, n: int, max_tokens: int, chunk: int, alpha: float):
    async def score(gen) -> float:
        return float(gen.text[0]) + len(gen.text) / 1000

    prompt = [ord(c) for c in "p"]
    spec = SpeculativeRejection(
        policy, [prompt], n, Sampling(max_tokens=max_tokens, seed=7), alpha, chunk, score
    )
    events = [e.generation async for e in spec.run()]
    return spec, events


async def test_speculative_rejection_keeps_the_best_and_saves_tokens() -> None:
    policy = GrowingPolicy(prompt_len=1)
    spec, events = await run_speculative(policy, n=16, max_tokens=40, chunk=10, alpha=0.5)
    assert len(events) == 16  # every candidate ends exactly once
    finished = [e for e in events if e.finish_reason != "rejected"]
    rejected = [e for e in events if e.finish_reason == "rejected"]
    assert len(finished) == 2 and len(rejected) == 14  # 16 -> 8 -> 4 -> 2, then max_tokens
    assert all(len(e.text) == 40 for e in finished)
    # partial reward predicts final reward here, so the survivors are the best digits drawn
    digits = sorted((e.text[0] for e in events), reverse=True)
    assert sorted((e.text[0] for e in finished), reverse=True) == digits[:2]
    assert spec.generated_tokens == 10 * (16 + 8 + 4 + 2) < 16 * 40
    assert spec.generated_tokens == policy.generated


async def test_speculative_rejection_never_rejects_a_finished_candidate() -> None:
    policy = GrowingPolicy(prompt_len=1, early_stop="0123")  # low digits stop after chunk 1
    _, events = await run_speculative(policy, n=16, max_tokens=30, chunk=10, alpha=0.75)
    for e in events:
        if e.text[0] in "0123":
            assert e.finish_reason == "stop" and len(e.text) == 10
    assert any(e.finish_reason == "rejected" for e in events)


async def test_kl_bound_is_reported_for_argmax_over_full_samples_only(setup) -> None:
    bon = service(setup, CategoricalPolicy(OUTPUTS, PROBS))
    full = await bon.run(BestOfNRequest(prompt=PROMPT, n=4, seed=1))
    assert full.results[0].kl_bound == pytest.approx(kl_bound(4))
    soft = await bon.run(BestOfNRequest(prompt=PROMPT, n=4, seed=1, selection="soft"))
    assert soft.results[0].kl_bound is None and "argmax" in soft.results[0].kl_bound_note
    spec = service(setup, GrowingPolicy(prompt_len=len(PROMPT)))
    resp = await spec.run(
        BestOfNRequest(prompt=PROMPT, n=4, seed=1, strategy="speculative", chunk_tokens=2)
    )
    assert resp.results[0].kl_bound is None and "speculative" in resp.results[0].kl_bound_note


async def test_speculative_rejected_candidates_keep_their_partial_reward(setup) -> None:
    """Scored once, on the partial text they were judged on: the reward /v1/rerank gives
    that text."""
    bon = service(setup, GrowingPolicy(prompt_len=len(PROMPT)))
    req = BestOfNRequest(
        prompt=PROMPT, n=8, seed=2, max_tokens=12, strategy="speculative", chunk_tokens=4,
        return_all=True,
    )  # fmt: skip
    resp = await bon.run(req)
    cands = resp.results[0].candidates
    rejected = [c for c in cands if c.finish_reason == "rejected"]
    assert rejected and resp.results[0].chosen.finish_reason != "rejected"
    direct = await bon.rerank(RerankRequest(prompt=PROMPT, candidates=[c.text for c in cands]))
    by_text = {r.text: r.reward for r in direct.results}
    for c in cands:
        assert c.reward == pytest.approx(by_text[c.text], abs=1e-5)
        assert c.tokens == len(c.text)  # one character per token here
    assert resp.usage.generated_tokens >= sum(c.tokens for c in cands)


async def test_rerank_past_its_deadline_is_deadline_exceeded(setup) -> None:
    bon = service(setup, CategoricalPolicy(OUTPUTS, PROBS))
    req = RerankRequest(prompt=PROMPT, candidates=OUTPUTS)
    with pytest.raises(DeadlineExceeded):
        # the deadline wins over a generous timeout_s
        await bon.rerank(req, timeout_s=60, deadline=time.monotonic() - 0.001)
    assert len((await bon.rerank(req, deadline=time.monotonic() + 60)).results) == len(OUTPUTS)
