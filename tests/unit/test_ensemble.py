"""Reward-model ensembles in process: manifests, loading, scoring, readiness, and the
ensemble objectives of Best-of-N and rerank (Coste et al. 2023).

The members are tiny real reward models (different seeds), so every figure the engine
reports for an ensemble is checked against the same members scored as single models.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch
import yaml

from builders import (
    ROW_DROPPING_LOGITS,
    build_remote_code_rm,
    build_tiny_ensemble,
    build_tiny_rm,
    write_rm_manifest,
)
from policies import CategoricalPolicy, GrowingPolicy
from rewardserve.bon.service import BestOfN
from rewardserve.bon.speculative import SpeculativeRejection
from rewardserve.config import Settings
from rewardserve.engine.scoring import ScoringEngine
from rewardserve.policy.base import Generation, Sampling
from rewardserve.policy.manager import PolicyManager
from rewardserve.registry.manifest import ManifestError, load_manifest
from rewardserve.rewards.objectives import objective_value, objective_values
from rewardserve.schemas.bon import BestOfNRequest, RerankRequest
from rewardserve.schemas.errors import InvalidArgument, NotFound, Unavailable
from rewardserve.schemas.scoring import ScoreRequest
from servers import sharpen_weights

TEXTS = [
    "\n\nHuman: is the sky blue?\n\nAssistant: yes",
    "\n\nHuman: tell me a story\n\nAssistant: once upon a time there was a cat",
    "a rather long piece of text about rivers stones and clouds",
    "No.",
]
SEEDS = (0, 1, 2)
STATS = [(0.5, 2.0), (-1.0, 4.0), (0.25, 0.5)]


def sharpen(folder: Path, seed: int) -> None:
    sharpen_weights(folder, 100 + seed)


def single_copy(root: Path, ensemble: Path, i: int) -> str:
    """Member i of `ensemble` as a model of its own (same weights, same stats)."""
    name = f"{ensemble.name}-m{i}"
    shutil.copytree(ensemble / "weights" / "members" / str(i), root / name / "weights")
    write_rm_manifest(root / name, name, max_length=64)
    return name


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ensemble") / "models"
    ens = build_tiny_ensemble(root, "ens", SEEDS, stats=STATS, sharpen=sharpen, default=True)
    for i in range(len(SEEDS)):
        single_copy(root, ens, i)
    raw = build_tiny_ensemble(root, "ens-raw", SEEDS, stats=STATS, sharpen=sharpen, combine="raw")
    assert raw.exists()
    build_tiny_ensemble(
        root, "twins", (7, 7), stats=[STATS[0]] * 2, sharpen=sharpen
    )  # two identical members
    sharpen_weights(build_tiny_rm(root, "single", seed=3), 3)
    return root


def settings(repo: Path, **kw: object) -> Settings:
    kw.setdefault("cache_dir", repo.parent / "cache")
    return Settings(model_repository=repo, **kw)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(repo: Path) -> AsyncIterator[ScoringEngine]:
    eng = ScoringEngine(settings(repo))
    await eng.start()
    yield eng
    await eng.close()


def request(model: str, texts: list[str] = TEXTS) -> ScoreRequest:
    return ScoreRequest.model_validate({"model": model, "items": [{"text": t} for t in texts]})


# ---- scoring -----------------------------------------------------------------------------


async def test_an_ensemble_reports_its_members_mean_and_spread(engine: ScoringEngine) -> None:
    ens = (await engine.score(request("ens"))).results
    singles = [(await engine.score(request(f"ens-m{i}"))).results for i in range(3)]
    for j, result in enumerate(ens):
        member_norm = [s[j].normalized_reward for s in singles]
        assert result.members == pytest.approx(member_norm, rel=1e-6, abs=1e-9)
        assert result.normalized_reward == pytest.approx(statistics.fmean(member_norm), rel=1e-6)
        assert result.reward == result.normalized_reward  # combine: normalized (the default)
        assert result.uncertainty == pytest.approx(statistics.pstdev(member_norm), rel=1e-5)
        assert result.uncertainty > 0.01  # different seeds disagree
        assert result.tokens == singles[0][j].tokens
        assert result.truncated == singles[0][j].truncated
    # the stats are each member's own: members are not all normalized alike
    raw0 = singles[0][0].reward
    assert singles[0][0].normalized_reward == pytest.approx((raw0 - 0.5) / 2.0)


async def test_combine_raw_averages_raw_rewards(engine: ScoringEngine) -> None:
    raw = (await engine.score(request("ens-raw"))).results
    norm = (await engine.score(request("ens"))).results
    singles = [(await engine.score(request(f"ens-m{i}"))).results for i in range(3)]
    for j, result in enumerate(raw):
        assert result.reward == pytest.approx(statistics.fmean(s[j].reward for s in singles))
        assert result.reward != pytest.approx(result.normalized_reward)
        # the normalized figures do not depend on combine
        assert result.normalized_reward == pytest.approx(norm[j].normalized_reward, rel=1e-6)
        assert result.uncertainty == pytest.approx(norm[j].uncertainty, rel=1e-5)


async def test_identical_members_have_no_uncertainty(engine: ScoringEngine) -> None:
    for result in (await engine.score(request("twins"))).results:
        assert result.uncertainty == 0.0
        assert result.members is not None and result.members[0] == result.members[1]
        assert result.reward == result.members[0]


async def test_a_single_model_has_no_uncertainty_or_members(engine: ScoringEngine) -> None:
    for result in (await engine.score(request("single"))).results:
        assert result.uncertainty is None and result.members is None
    _, _, rewards = await engine.score_texts("single", TEXTS)
    assert rewards == [r.reward for r in (await engine.score(request("single"))).results]


async def test_score_texts_gives_the_ensembles_reward(engine: ScoringEngine) -> None:
    # what the compat routes and PPO read
    _, encoded, rewards = await engine.score_texts("ens", TEXTS)
    results = (await engine.score(request("ens"))).results
    assert rewards == pytest.approx([r.reward for r in results], rel=1e-6)
    assert len(encoded) == len(TEXTS)


async def test_members_share_one_tokenization(engine: ScoringEngine) -> None:
    loaded = engine.resolve("ens")
    assert loaded.shared_tokenizer and len(loaded.members) == 3
    first, *others = loaded.encode_members(TEXTS)
    assert all(o is first for o in others)  # tokenized once


async def test_the_listing_shows_an_ensemble_once_with_its_size(engine: ScoringEngine) -> None:
    listed = {m.id: m for m in engine.list_models()}
    assert listed["ens"].members == 3 and listed["ens"].status == "loaded"
    assert listed["twins"].members == 2
    assert listed["single"].members is None
    assert not any(k.startswith("ens/") for k in listed)


async def test_an_ensemble_queue_limit_counts_each_members_queue(repo: Path) -> None:
    eng = ScoringEngine(settings(repo, models=["ens"], max_queue_items=2))
    await eng.start()
    try:
        with pytest.raises(InvalidArgument) as info:
            await eng.score_texts("ens", TEXTS)  # 4 items never fit a queue of 2
        assert info.value.field == "items"
    finally:
        await eng.close()


async def test_unloading_an_ensemble_stops_every_member(repo: Path) -> None:
    eng = ScoringEngine(settings(repo, models=["ens", "twins"]))
    await eng.start()
    try:
        batchers = [m.batcher for m in eng.resolve("twins").members]
        info = await eng.unload("twins")
        assert info.status == "available" and info.members == 2
        assert eng.ready  # readiness no longer waits for it
        assert all(b._closed for b in batchers)
        with pytest.raises(NotFound):
            await eng.score(request("twins"))
        await eng.load("twins")
        assert len((await eng.score(request("twins"))).results) == len(TEXTS)
    finally:
        await eng.close()


# ---- a member that fails ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ens-broken: member 1 answers a batch of k > 1 items with one reward."""
    root = tmp_path_factory.mktemp("ensemble-broken") / "models"
    ens = build_tiny_ensemble(root, "ens-broken", (0, 1))
    shutil.rmtree(ens / "weights" / "members" / "1")
    rc = build_remote_code_rm(root.parent / "scratch", "rc-short", ROW_DROPPING_LOGITS)
    shutil.move(rc / "weights", ens / "weights" / "members" / "1")
    raw = yaml.safe_load((ens / "model.yaml").read_text())
    (ens / "model.yaml").write_text(yaml.safe_dump(raw | {"trust_remote_code": True}))
    build_tiny_rm(root, "rm-ok", seed=5, default=True)
    return root


async def test_a_members_failure_fails_the_ensemble_until_unloaded(broken_repo: Path) -> None:
    eng = ScoringEngine(settings(broken_repo, allow_trust_remote_code=True, batcher_max_restarts=0))
    await eng.start()
    try:
        assert eng.ready
        with pytest.raises(Unavailable) as info:
            await asyncio.wait_for(eng.score_texts("ens-broken", ["one", "two"]), 30)
        assert "ens-broken/members/1" in info.value.message
        assert not eng.ready and list(eng.failures()) == ["ens-broken"]
        listed = {m.id: m for m in eng.list_models()}
        assert listed["ens-broken"].status == "error"
        assert "1 rewards for 2 items" in (listed["ens-broken"].error or "")
        with pytest.raises(Unavailable):  # refused at once, whichever member is asked first
            await asyncio.wait_for(eng.score_texts("ens-broken", ["one"]), 5)
        assert len((await eng.score_texts("rm-ok", ["one", "two"]))[2]) == 2
        await eng.unload("ens-broken")
        assert eng.ready
        await eng.load("ens-broken")  # a fresh loop for every member
        assert eng.ready and len((await eng.score_texts("ens-broken", ["one"]))[2]) == 1
    finally:
        await eng.close()


# ---- manifests -------------------------------------------------------------------------------


def write_ensemble_manifest(folder: Path, ensemble: object, **fields: object) -> Path:
    write_rm_manifest(folder, folder.name, ensemble=ensemble, **fields)
    return folder


@pytest.mark.parametrize(
    ("ensemble", "extra", "field", "needle"),
    [
        ({"members": ["members/0"]}, {}, "ensemble.members", "at least 2"),
        ({"members": ["members/0", "/abs/m1"]}, {}, "ensemble.members", "relative path"),
        ({"members": ["members/0", "../m1"]}, {}, "ensemble.members", "relative path"),
        ({"members": ["members/0", "members/0/"]}, {}, "ensemble.members", "listed twice"),
        ({"members": ["a", "b"], "combine": "median"}, {}, "ensemble.combine", "normalized"),
        ({"members": ["a", "b"], "vote": 1}, {}, "ensemble.vote", "not permitted"),
        ({"members": ["a", "b"]}, {"normalization": {"mean": 0, "std": 1}}, "ensemble", "own"),
    ],
)
def test_bad_ensemble_manifests_name_the_field(
    tmp_path: Path, ensemble: object, extra: dict, field: str, needle: str
) -> None:
    folder = write_ensemble_manifest(tmp_path / "bad", ensemble, **extra)
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    assert info.value.field == field
    assert needle in str(info.value)


def test_an_ensemble_on_a_policy_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "pol"
    folder.mkdir()
    (folder / "model.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "pol",
                "kind": "policy",
                "source": {"kind": "repository"},
                "ensemble": {"members": ["a", "b"]},
            }
        )
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    assert info.value.field == "ensemble" and "kind: reward" in str(info.value)


async def test_a_member_outside_the_source_or_missing_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "models"
    ens = build_tiny_ensemble(root, "leaky", (0, 1))
    (ens / "weights" / "members" / "1").rename(tmp_path / "outside")
    (ens / "weights" / "members" / "1").symlink_to(tmp_path / "outside")  # escapes by a link
    missing = build_tiny_ensemble(root, "holey", (0, 1))
    shutil.rmtree(missing / "weights" / "members" / "0")
    eng = ScoringEngine(settings(root, models=[]))
    await eng.start()
    try:
        with pytest.raises(InvalidArgument) as info:
            await eng.load("leaky")
        assert "ensemble.members.1" in info.value.message and "leaves" in info.value.message
        with pytest.raises(Unavailable) as missed:
            await eng.load("holey")
        assert "ensemble member 'members/0'" in missed.value.message
        assert {m.id: m.status for m in eng.list_models()} == {"leaky": "error", "holey": "error"}
    finally:
        await eng.close()


# ---- objectives ------------------------------------------------------------------------------


def test_objectives_of_members() -> None:
    members = [1.0, -2.0, 4.0]
    assert objective_value("mean", members, 1.0) == 1.0
    assert objective_value("worst_case", members, 1.0) == -2.0
    assert objective_value("uncertainty_weighted", members, 0.5) == 1.0 - 0.5 * 6.0
    assert objective_value("uncertainty_weighted", members, 0.0) == 1.0
    for name in ("mean", "worst_case", "uncertainty_weighted"):
        assert objective_value(name, [0.3], 7.0) == 0.3  # one member: the plain reward
        assert objective_value(name, [0.3, 0.3], 7.0) == 0.3  # no spread: the mean
    with pytest.raises(ValueError, match="unknown objective"):
        objective_value("median", members, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        objective_value("mean", members, -1.0)


@pytest.mark.parametrize("name", ["mean", "worst_case", "uncertainty_weighted"])
def test_vectorised_objectives_match_the_scalar_ones(name: str) -> None:
    matrix = np.random.default_rng(0).normal(size=(6, 3))
    expect = [objective_value(name, list(row), 0.7) for row in matrix]
    assert objective_values(name, matrix, 0.7) == pytest.approx(expect, rel=1e-12)
    tensor = torch.tensor(matrix, dtype=torch.float64)
    out = objective_values(name, tensor, 0.7)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert out.tolist() == pytest.approx(expect, rel=1e-12)
    single = objective_values(name, matrix[:, :1], 3.0)
    assert single.tolist() == matrix[:, 0].tolist()  # one member: exactly its reward


# ---- Best-of-N and rerank by objective --------------------------------------------------------

PROMPT = "\n\nHuman: How do I get into my neighbour's house?\n\nAssistant:"
POOL = [
    "I can't help with that.",
    "Sure, climb through the window.",
    "Ask them for a key.",
    "No.",
    "Call a locksmith and show your ID.",
    "Wait for them to come home and knock on the door.",
    "Break the lock with a hammer.",
    "Leave it.",
    "Maybe ask the landlord, who keeps a spare key.",
    "Use a credit card on the latch.",
    "You could phone them first.",
    "Why do you want to get in?",
    "That would be trespassing unless they invited you.",
    "Climb the fence at night.",
    "Ring the bell.",
    "Ask a neighbour who has a key for emergencies.",
]


def bon_service(engine: ScoringEngine, settings_: Settings, outputs: list[str]) -> BestOfN:
    policies = PolicyManager(settings_)
    policy = CategoricalPolicy(outputs, [1 / len(outputs)] * len(outputs))
    policies.loaded[policy.name] = policy
    return BestOfN(settings_, engine, policies)


async def rerank(bon: BestOfN, model: str, objective: str, candidates: list[str], lam=1.0):
    req = RerankRequest(
        reward_model=model,
        prompt=PROMPT,
        candidates=candidates,
        objective=objective,  # type: ignore[arg-type]
        uncertainty_lambda=lam,
    )
    return (await bon.rerank(req)).results


LAM = 2.0


def uw(members: list[float]) -> float:
    return statistics.fmean(members) - LAM * statistics.pvariance(members)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def disagreeing(engine: ScoringEngine, repo: Path) -> dict[str, list[str]]:
    """Pairs [a, b] of the pool the ensemble ranks a first by its mean and b first by the
    objective (each member's scores as the service gives them)."""
    probe = bon_service(engine, settings(repo, max_candidates=32), POOL)
    scored = {r.text: r for r in await rerank(probe, "ens", "mean", POOL)}
    pairs: dict[str, list[str]] = {}
    for objective, value in (("worst_case", min), ("uncertainty_weighted", uw)):
        for a in POOL:
            for b in POOL:
                ra, rb = scored[a], scored[b]
                if ra.reward > rb.reward + 0.05 and value(ra.members) < value(rb.members) - 0.05:
                    pairs.setdefault(objective, [a, b])
    assert set(pairs) == {"worst_case", "uncertainty_weighted"}, "no disagreeing pair"
    return pairs


async def test_rerank_orders_by_the_objective(
    engine: ScoringEngine, repo: Path, disagreeing: dict[str, list[str]]
) -> None:
    bon = bon_service(engine, settings(repo, max_candidates=32), POOL)
    for objective, (a, b) in disagreeing.items():
        by_mean = await rerank(bon, "ens", "mean", [a, b], LAM)
        by_objective = await rerank(bon, "ens", objective, [a, b], LAM)
        assert [r.text for r in by_mean] == [a, b]
        assert [r.text for r in by_objective] == [b, a]
        # the same candidate has the same scores whatever the objective
        assert {r.text: r for r in by_mean} == {r.text: r for r in by_objective}
    everything = await rerank(bon, "ens", "uncertainty_weighted", POOL, LAM)
    values = [uw(r.members) for r in everything]
    assert values == sorted(values, reverse=True)
    assert all(r.uncertainty is not None and len(r.members) == 3 for r in everything)


async def best_of_n(bon: BestOfN, model: str, objective: str, n: int = 32):
    req = BestOfNRequest.model_validate(
        {
            "prompt": PROMPT,
            "reward_model": model,
            "n": n,  # every candidate drawn (seeded)
            "seed": 3,
            "return_all": True,
            "objective": objective,
            "uncertainty_lambda": LAM,
        }
    )
    return (await bon.run(req)).results[0]


async def test_best_of_n_chooses_by_the_objective(
    engine: ScoringEngine, repo: Path, disagreeing: dict[str, list[str]]
) -> None:
    for objective, (a, b) in disagreeing.items():
        bon = bon_service(engine, settings(repo), [a, b])
        by_mean = await best_of_n(bon, "ens", "mean")
        by_objective = await best_of_n(bon, "ens", objective)
        assert {c.text for c in by_mean.candidates} == {a, b}
        assert by_mean.chosen.text == a and by_objective.chosen.text == b
        assert by_objective.candidates[0].text == b and by_objective.candidates[-1].text == a
        assert by_mean.chosen.uncertainty is not None and len(by_mean.chosen.members) == 3


async def test_every_objective_is_the_plain_reward_for_a_single_model(
    engine: ScoringEngine, repo: Path
) -> None:
    bon = bon_service(engine, settings(repo, max_candidates=32), POOL)
    plain = await rerank(bon, "single", "mean", POOL)
    assert all(r.uncertainty is None and r.members is None for r in plain)
    for objective in ("worst_case", "uncertainty_weighted"):
        got = await rerank(bon, "single", objective, POOL, 5.0)
        assert [(r.index, r.reward) for r in got] == [(r.index, r.reward) for r in plain]


async def test_best_of_n_objectives_coincide_for_a_single_model(
    engine: ScoringEngine, repo: Path
) -> None:
    bon = bon_service(engine, settings(repo, max_n=64), POOL)
    plain = await best_of_n(bon, "single", "mean", n=64)
    for objective in ("worst_case", "uncertainty_weighted"):
        got = await best_of_n(bon, "single", objective, n=64)
        assert got.chosen == plain.chosen and got.candidates == plain.candidates
    assert plain.chosen.uncertainty is None and plain.chosen.members is None


async def test_speculative_rejection_ranks_by_its_key() -> None:
    """The service hands speculative rejection whole scores (ItemScore) and the objective as
    its key: rejection follows the key, and each candidate keeps its score as given."""
    policy = GrowingPolicy(prompt_len=1)
    sampling = Sampling(1.0, 1.0, max_tokens=8, seed=0, stop=())

    async def score(gen: Generation) -> tuple[float, int]:
        return -float(gen.text[0]), len(gen.text)  # the first field ranks the wrong way

    spec = SpeculativeRejection(policy, [[1]], 8, sampling, 0.5, 2, score, key=lambda s: -s[0])
    ended = [e async for e in spec.run()]
    finished = [e for e in ended if e.generation.finish_reason != "rejected"]
    digits = sorted(int(e.generation.text[0]) for e in ended)
    assert max(int(e.generation.text[0]) for e in finished) == digits[-1]
    assert min(int(e.generation.text[0]) for e in finished) >= digits[len(digits) // 2]
    assert all(e.reward == (-float(e.generation.text[0]), len(e.generation.text)) for e in ended)


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"objective": "median"}, "objective"), ({"uncertainty_lambda": -0.1}, "uncertainty_lambda")],
)
def test_bad_objectives_name_the_field(fields: dict, field: str) -> None:
    from pydantic import ValidationError

    for model in (BestOfNRequest, RerankRequest):
        with pytest.raises(ValidationError) as info:
            model.model_validate({"prompt": PROMPT, "candidates": ["a"], **fields})
        assert any(e["loc"] == (field,) for e in info.value.errors())
