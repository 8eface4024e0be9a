"""Composite rewards in process: the real engine over a repository of tiny real reward models
and composites of them with rule parts; Best-of-N and rerank with a composite; PPO's config and
reward source naming one."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from builders import build_tiny_rm, write_manifest
from policies import CategoricalPolicy
from ppo_models import PROMPTS, build_tiny_chat_policy
from rewardserve.bon.service import BestOfN
from rewardserve.config import Settings
from rewardserve.engine.scoring import ScoringEngine
from rewardserve.policy.manager import PolicyManager
from rewardserve.schemas.bon import BestOfNRequest, PromptInput, RerankRequest
from rewardserve.schemas.errors import InvalidArgument
from rewardserve.schemas.scoring import ScoreRequest
from rewardserve.training.ppo.config import ConfigError, validate_config
from rewardserve.training.ppo.remote_rewards import service_item
from rewardserve.training.ppo.rewards import InProcessReward
from servers import sharpen_weights

PROMPT = "\n\nHuman: What is the capital of France?\n\nAssistant:"
ANSWERS = ["Paris.", "It is Paris, a large city on the Seine in the north of France.", "Lyon"]
WEIGHTS = {"rm": 1.0, "rm-raw": 0.5, "brevity": 0.3, "format": 0.25, "correct": 2.0}


def write_composites(root: Path) -> None:
    write_manifest(
        root / "mix",
        name="mix",
        kind="reward",
        composite={
            "parts": [
                {"name": "rm", "model": "rm-a", "weight": WEIGHTS["rm"]},
                {"name": "rm-raw", "model": "rm-a", "use": "raw", "weight": WEIGHTS["rm-raw"]},
                {
                    "name": "brevity",
                    "rule": "length_penalty",
                    "weight": WEIGHTS["brevity"],
                    "params": {"target": 3, "per": 2},
                },
                {
                    "name": "format",
                    "rule": "regex",
                    "weight": WEIGHTS["format"],
                    "params": {"pattern": r"\.$"},
                },
                {
                    "name": "correct",
                    "rule": "exact_match",
                    "weight": WEIGHTS["correct"],
                    "params": {"extract": r"(Paris|Lyon)"},
                },
            ]
        },
    )
    rules_only = {"name": "short", "rule": "length_penalty", "params": {"target": 2}}
    write_manifest(root / "rules", name="rules", kind="reward", composite={"parts": [rules_only]})
    write_manifest(  # a composite naming a composite: refused, which also rules out cycles
        root / "nested",
        name="nested",
        kind="reward",
        composite={"parts": [{"name": "inner", "model": "mix"}, rules_only]},
    )
    write_manifest(
        root / "dangling",
        name="dangling",
        kind="reward",
        composite={"parts": [{"name": "gone", "model": "no-such-rm"}]},
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("composite") / "models"
    sharpen_weights(build_tiny_rm(root, "rm-a", seed=0, default=True, stats=(0.5, 2.0)), 1)
    write_composites(root)
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(repo: Path) -> AsyncIterator[ScoringEngine]:
    settings = Settings(model_repository=repo, cache_dir=repo.parent / "cache")
    eng = ScoringEngine(settings)
    await eng.start()
    yield eng
    await eng.close()


def items(*responses: str, label: str | None = "Paris") -> list[dict]:
    return [{"prompt": PROMPT, "response": r, "label": label} for r in responses]


async def score(engine: ScoringEngine, model: str, its: list[dict], **fields: object):
    return await engine.score(ScoreRequest.model_validate({"model": model, "items": its} | fields))


async def test_start_loads_the_servable_composites_only(engine: ScoringEngine) -> None:
    assert set(engine.composites) == {"mix", "rules"}
    assert engine.ready
    status = {m.id: (m.status, m.error) for m in engine.list_models()}
    assert status["mix"] == ("loaded", None)
    assert status["nested"][0] == "error" and "not other composites" in status["nested"][1]
    assert status["dangling"][0] == "error" and "no-such-rm" in status["dangling"][1]


async def test_total_is_the_weighted_sum_of_parts(engine: ScoringEngine) -> None:
    resp = await score(engine, "mix", items(*ANSWERS))
    alone = await score(engine, "rm-a", [{"prompt": PROMPT, "response": a} for a in ANSWERS])
    assert resp.model == "mix"
    for r, plain in zip(resp.results, alone.results, strict=True):
        assert r.parts is not None and set(r.parts) == set(WEIGHTS)
        # a model part is exactly that model scored alone, on the scale its `use` says
        assert r.parts["rm"] == plain.normalized_reward
        assert r.parts["rm-raw"] == plain.reward
        assert r.tokens == plain.tokens and r.truncated == plain.truncated
        total = sum(WEIGHTS[k] * v for k, v in r.parts.items())
        assert r.reward == total and r.normalized_reward == total
    brevity = [r.parts["brevity"] for r in resp.results]  # 1, 14 and 1 words; target 3, per 2
    assert brevity == [0.0, -5.5, 0.0]
    assert [r.parts["format"] for r in resp.results] == [1.0, 1.0, 0.0]
    assert [r.parts["correct"] for r in resp.results] == [1.0, 1.0, 0.0]
    assert resp.usage.prompt_tokens == sum(r.tokens for r in alone.results)


async def test_request_weights_override_the_manifest(engine: ScoringEngine) -> None:
    base = await score(engine, "mix", items(*ANSWERS))
    over = await score(engine, "mix", items(*ANSWERS), weights={"correct": -1.0, "rm": 0})
    w = WEIGHTS | {"correct": -1.0, "rm": 0.0}
    for b, o in zip(base.results, over.results, strict=True):
        assert o.parts == b.parts
        assert o.reward == sum(w[k] * v for k, v in o.parts.items())
        assert o.reward != b.reward


async def test_rules_only_composite_reads_no_tokens(engine: ScoringEngine) -> None:
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    resp = await score(engine, "rules", [{"text": "a b c d"}, {"messages": chat}])
    assert [r.reward for r in resp.results] == [-0.02, 0.0]  # 4 words: 2 over, per 100
    assert [r.tokens for r in resp.results] == [0, 0] and resp.usage.total_tokens == 0


@pytest.mark.parametrize(
    ("model", "its", "fields", "field"),
    [
        ("mix", items("Paris.", label=None), {}, "items.0.label"),
        ("mix", items("Paris.") + items("x", label=None), {}, "items.1.label"),
        ("mix", items("Paris."), {"weights": {"nope": 1.0}}, "weights.nope"),
        ("rm-a", items("Paris."), {"weights": {"rm": 1.0}}, "weights"),
    ],
    ids=["no label", "second item without label", "unknown part", "weights on a plain model"],
)
async def test_bad_requests_name_the_field(
    engine: ScoringEngine, model: str, its: list[dict], fields: dict, field: str
) -> None:
    with pytest.raises(InvalidArgument) as e:
        await score(engine, model, its, **fields)
    assert e.value.field == field, e.value.message


def test_weights_must_be_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        ScoreRequest.model_validate({"items": [{"text": "x"}], "weights": {"a": float("inf")}})


async def test_a_composite_part_naming_a_composite_does_not_load(engine: ScoringEngine) -> None:
    with pytest.raises(InvalidArgument) as e:
        await engine.load("nested")
    assert e.value.field == "model" and "not other composites" in e.value.message


async def test_unload_a_composite_keeps_its_models(engine: ScoringEngine) -> None:
    await engine.unload("rules")
    assert "rules" not in engine.composites and "rm-a" in engine.models
    await engine.load("rules")
    assert "rules" in engine.composites


# ---- Best-of-N and rerank ------------------------------------------------------------------


def bon(engine: ScoringEngine) -> BestOfN:
    policies = PolicyManager(engine.settings)
    policy = CategoricalPolicy(ANSWERS, [0.4, 0.3, 0.3])
    policies.loaded[policy.name] = policy
    return BestOfN(engine.settings, engine, policies)


async def test_best_of_n_with_a_composite_picks_the_best_total(engine: ScoringEngine) -> None:
    totals = await score(engine, "mix", items(*ANSWERS))
    by_text = {a: r.reward for a, r in zip(ANSWERS, totals.results, strict=True)}
    req = BestOfNRequest(
        prompts=[PromptInput(prompt=PROMPT, label="Paris")], reward_model="mix", n=6, seed=3,
        return_all=True, temperature=1.0)  # fmt: skip
    resp = await bon(engine).run(req)
    assert resp.reward_model == "mix"
    (result,) = resp.results
    for c in result.candidates:  # the candidate as the composite scores the prompt + it
        # (to batching noise: BoN scores each candidate alone, this batch of three together)
        assert c.reward == pytest.approx(by_text[c.text], rel=1e-5)
        assert c.normalized_reward == c.reward
    assert result.chosen.reward == max(c.reward for c in result.candidates)


async def test_best_of_n_needs_labels_for_exact_match(engine: ScoringEngine) -> None:
    req = BestOfNRequest(prompt=PROMPT, reward_model="mix", n=2, seed=0)
    with pytest.raises(InvalidArgument) as e:
        await bon(engine).run(req)
    assert e.value.field == "items.0.label"


async def test_rerank_with_a_composite(engine: ScoringEngine) -> None:
    totals = await score(engine, "mix", items(*ANSWERS))
    resp = await bon(engine).rerank(
        RerankRequest(prompt=PROMPT, candidates=ANSWERS, reward_model="mix", label="Paris")
    )
    assert [r.reward for r in resp.results] == sorted(
        (r.reward for r in totals.results), reverse=True
    )  # the same batch of the same texts: the same floats
    assert resp.usage.total_tokens == totals.usage.total_tokens


# ---- PPO -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_repo(repo: Path) -> Path:
    build_tiny_chat_policy(repo)
    return repo


def ppo_config(repo: Path, **over: object) -> dict[str, object]:
    return {"model_repository": str(repo), "cache_dir": str(repo.parent / "cache"),
            "prompts": PROMPTS, "batch_size": 2, "samples_per_prompt": 2,
            "mini_batch_size": 2} | over  # fmt: skip


def test_ppo_config_accepts_a_composite_reward(ppo_repo: Path) -> None:
    assert validate_config(ppo_config(ppo_repo, reward_model="mix")).reward_model == "mix"


@pytest.mark.parametrize("name", ["nested", "dangling"])
def test_ppo_config_refuses_an_unservable_composite(ppo_repo: Path, name: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate_config(ppo_config(ppo_repo, reward_model=name))
    assert e.value.field == "reward_model"


def test_ppo_reward_of_a_composite_is_its_total(ppo_repo: Path) -> None:
    settings = Settings(model_repository=ppo_repo, cache_dir=ppo_repo.parent / "cache")
    source = InProcessReward(settings, "mix")
    try:
        paris, lyon = (PromptInput(prompt=PROMPT, label=a) for a in ("Paris", "Lyon"))
        prompts = [paris, paris, lyon]
        got = source.score(prompts, ["Paris.", "Lyon", "Lyon"])
        alone = source.score([PromptInput(prompt=PROMPT, label="x")], ["Paris."])  # wrong label
    finally:
        source.close()
    assert source.model == "mix"
    assert got[2] - got[1] == pytest.approx(WEIGHTS["correct"])  # the same text, now correct
    assert got[0] - alone[0] == pytest.approx(WEIGHTS["correct"])


def test_prompt_labels_travel_to_the_service_and_from_prompt_files(ppo_repo, tmp_path) -> None:
    labelled = PromptInput(prompt=PROMPT, label="Paris")
    assert service_item(labelled, "Paris.").label == "Paris"
    assert service_item(labelled, "").label == "Paris"  # an empty reply still carries it
    chat = PromptInput(messages=[{"role": "user", "content": "Capital?"}], label="Paris")
    assert service_item(chat, "Paris").label == "Paris"
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Capital of France?", "label": "Paris"}) + "\n" * 2)
    cfg = validate_config(ppo_config(ppo_repo, prompts=None, prompts_file=str(f), eval_fraction=0))
    assert [p.label for p in cfg.split_prompts()[0]] == ["Paris"]
