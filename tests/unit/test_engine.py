"""ScoringEngine in-process over a repository of tiny real transformers reward models."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

from builders import (
    ROW_DROPPING_LOGITS,
    build_remote_code_rm,
    build_tiny_openrlhf_rm,
    build_tiny_rm,
    tiny_config,
    write_manifest,
)
from rewardserve.config import Settings
from rewardserve.engine.batcher import plan_microbatches
from rewardserve.engine.scoring import ScoringEngine
from rewardserve.schemas.errors import InvalidArgument, NotFound, Unavailable
from rewardserve.schemas.scoring import ScoreRequest
from servers import sharpen_weights

SHORT = "\n\nHuman: is the sky blue?\n\nAssistant: yes"
LONG_1 = "\n\nHuman: tell me a story\n\nAssistant: " + "once upon a time there was a cat " * 3
LONG_2 = "a rather long piece of text about rivers stones and clouds " * 3


def req(*items: dict, model: str | None = None) -> ScoreRequest:
    return ScoreRequest.model_validate({"model": model, "items": list(items)})


def text(t: str) -> dict:
    return {"text": t}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engine") / "models"
    sharpen_weights(build_tiny_rm(root, "rm-a", seed=0, default=True, stats=(0.5, 2.0)), 1)
    sharpen_weights(build_tiny_rm(root, "rm-b", seed=1, stats=None), 2)
    sharpen_weights(build_tiny_openrlhf_rm(root, "orlhf", seed=2), 3)
    # manifest normalization overrides the stats in config.json
    norm = build_tiny_rm(root, "rm-norm", seed=3, stats=(0.5, 2.0))
    sharpen_weights(norm, 4)
    raw = yaml.safe_load((norm / "model.yaml").read_text())
    raw["normalization"] = {"mean": 3.0, "std": 0.5}
    (norm / "model.yaml").write_text(yaml.safe_dump(raw))
    write_manifest(
        root / "policy-x", name="policy-x", kind="policy", source={"kind": "cache", "path": "p"}
    )
    write_manifest(  # weights not built
        root / "ghost", name="ghost", kind="reward", source={"kind": "cache", "path": "ghost"}
    )
    (root / "broken").mkdir()
    (root / "broken" / "model.yaml").write_text("name: broken\nkind: reward\nsource: 3\n")
    return root


def settings(repo: Path, **kw: object) -> Settings:
    kw.setdefault("cache_dir", repo.parent / "cache")
    kw.setdefault("max_items_per_request", 4)
    kw.setdefault("max_text_chars", 2000)
    return Settings(model_repository=repo, **kw)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(repo: Path) -> AsyncIterator[ScoringEngine]:
    eng = ScoringEngine(settings(repo))
    await eng.start()
    yield eng
    await eng.close()


async def rewards(engine: ScoringEngine, texts: list[str], model: str | None = None):
    resp = await engine.score(req(*(text(t) for t in texts), model=model))
    return [r.reward for r in resp.results]


# ---- start-up and listing --------------------------------------------------------------


async def test_start_loads_every_reward_model_with_weights(engine: ScoringEngine) -> None:
    assert sorted(engine.models) == ["orlhf", "rm-a", "rm-b", "rm-norm"]
    assert engine.ready
    listed = {m.id: m for m in engine.list_models()}
    assert listed["rm-a"].status == "loaded" and listed["rm-a"].default
    assert listed["ghost"].status == "error" and "not built" in (listed["ghost"].error or "")
    assert listed["policy-x"].kind == "policy" and listed["policy-x"].status == "available"
    assert listed["broken"].status == "error" and "source" in (listed["broken"].error or "")
    assert sum(m.default for m in listed.values()) == 1


# ---- rewards -----------------------------------------------------------------------------


async def test_normalization_uses_stats_from_config_json(engine: ScoringEngine) -> None:
    resp = await engine.score(req(text(SHORT), text(LONG_1), model="rm-a"))
    assert resp.model == "rm-a"
    for r in resp.results:
        assert r.normalized_reward == pytest.approx((r.reward - 0.5) / 2.0, abs=1e-12)
    assert resp.results[0].reward != pytest.approx(resp.results[1].reward, abs=1e-3)


async def test_without_stats_normalized_equals_raw(engine: ScoringEngine) -> None:
    resp = await engine.score(req(text(SHORT), model="rm-b"))
    assert resp.results[0].normalized_reward == resp.results[0].reward


async def test_manifest_normalization_overrides_config(engine: ScoringEngine) -> None:
    resp = await engine.score(req(text(SHORT), model="rm-norm"))
    r = resp.results[0]
    assert r.normalized_reward == pytest.approx((r.reward - 3.0) / 0.5, abs=1e-12)


def manual_tokens(repo: Path, name: str, t: str) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(repo / name / "weights")
    return torch.tensor([tok(t)["input_ids"]])


async def test_sequence_classification_reward_matches_manual_forward(
    engine: ScoringEngine, repo: Path
) -> None:
    model = BertForSequenceClassification.from_pretrained(repo / "rm-a" / "weights").eval()
    with torch.no_grad():
        expected = model(input_ids=manual_tokens(repo, "rm-a", LONG_1)).logits[0, 0].item()
    (got,) = await rewards(engine, [LONG_1], model="rm-a")
    assert got == pytest.approx(expected, abs=1e-5)


async def test_openrlhf_reward_is_value_head_at_last_token(
    engine: ScoringEngine, repo: Path
) -> None:
    weights = repo / "orlhf" / "weights"
    state = load_file(str(weights / "model.safetensors"))
    head = state.pop("value_head.weight")
    backbone = BertModel(tiny_config(), add_pooling_layer=False).eval()
    missing, unexpected = backbone.load_state_dict(
        {k.removeprefix("bert."): v for k, v in state.items()}, strict=False
    )
    assert not unexpected and all("position_ids" in k for k in missing)
    ids = manual_tokens(repo, "orlhf", SHORT)
    with torch.no_grad():
        values = (backbone(input_ids=ids).last_hidden_state @ head.T)[0, :, 0]
    expected_last, first = values[-1].item(), values[0].item()
    assert abs(expected_last - first) > 1e-3  # the test can tell which token was used

    resp = await engine.score(req(text(SHORT), model="orlhf"))
    r = resp.results[0]
    assert r.reward == pytest.approx(expected_last, abs=1e-5)
    assert r.normalized_reward == pytest.approx((r.reward - 0.1) / 3.0, abs=1e-9)
    assert r.tokens == ids.shape[1]


@pytest.mark.parametrize("model", ["rm-a", "orlhf"])
async def test_padding_invariance(engine: ScoringEngine, model: str) -> None:
    loaded = engine.models[model]
    lengths = [len(e) for e in loaded.encode([LONG_1, SHORT, LONG_2])]
    assert lengths[1] < min(lengths[0], lengths[2])
    # precondition: all three go through one padded forward
    assert len(plan_microbatches(lengths)) == 1

    alone = [(await rewards(engine, [t], model=model))[0] for t in (LONG_1, SHORT, LONG_2)]
    together = await rewards(engine, [LONG_1, SHORT, LONG_2], model=model)
    for a, b in zip(alone, together, strict=True):
        assert b == pytest.approx(a, abs=1e-5)
    # and the three differ, so a mixed-up order would be caught
    assert len({round(x, 3) for x in alone}) == 3


async def test_results_follow_request_order_when_lengths_are_mixed(
    engine: ScoringEngine,
) -> None:
    texts = [LONG_2 * 2, "hi", LONG_1, "short one"]
    alone = [(await rewards(engine, [t]))[0] for t in texts]
    together = await engine.score(req(*(text(t) for t in texts)))
    assert [r.index for r in together.results] == [0, 1, 2, 3]
    for a, r in zip(alone, together.results, strict=True):
        assert r.reward == pytest.approx(a, abs=1e-5)


async def test_truncation_flag_and_token_counts(engine: ScoringEngine) -> None:
    long = "word " * 300
    resp = await engine.score(req(text(SHORT), text(long), model="rm-a"))
    short_r, long_r = resp.results
    assert not short_r.truncated and short_r.tokens < 64
    assert long_r.truncated and long_r.tokens == 64  # rm-a has max_length 64
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == short_r.tokens + 64


async def test_three_item_forms_score_their_rendered_text(engine: ScoringEngine) -> None:
    pair = {"prompt": "\n\nHuman: is the sky blue?\n\nAssistant:", "response": "yes"}
    messages = {
        "messages": [
            {"role": "user", "content": "is the sky blue?"},
            {"role": "assistant", "content": "yes"},
        ]
    }
    (as_text,) = (await engine.score(req(text(SHORT)))).results
    (as_pair,) = (await engine.score(req(pair))).results
    (as_chat,) = (await engine.score(req(messages))).results
    assert as_pair.reward == as_text.reward == as_chat.reward
    assert as_pair.tokens == as_text.tokens == as_chat.tokens


# ---- default model -------------------------------------------------------------------------


async def test_default_is_the_manifest_marked_model(engine: ScoringEngine) -> None:
    resp = await engine.score(req(text(SHORT)))
    assert resp.model == "rm-a"
    assert engine.resolve(None) is engine.models["rm-a"]


async def test_unloaded_default_is_unavailable_not_another_model(engine: ScoringEngine) -> None:
    await engine.unload("rm-a")
    try:
        with pytest.raises(Unavailable, match="rm-a"):
            await engine.score(req(text(SHORT)))
        with pytest.raises(NotFound) as info:
            await engine.score(req(text(SHORT), model="rm-a"))
        assert info.value.field == "model"
        assert (await engine.score(req(text(SHORT), model="rm-b"))).model == "rm-b"
        assert not engine.ready  # readiness tracks the start-up set
    finally:
        await engine.load("rm-a")
    assert engine.ready
    assert (await engine.score(req(text(SHORT)))).model == "rm-a"


async def test_configured_default_model_wins(repo: Path) -> None:
    eng = ScoringEngine(settings(repo, models=["rm-a", "rm-b"], default_model="rm-b"))
    await eng.start()
    try:
        assert sorted(eng.models) == ["rm-a", "rm-b"]
        assert (await eng.score(req(text(SHORT)))).model == "rm-b"
        info = {m.id: m for m in eng.list_models()}
        assert info["rm-b"].default and not info["rm-a"].default
    finally:
        await eng.close()


async def test_configured_default_not_loaded_is_unavailable(repo: Path) -> None:
    eng = ScoringEngine(settings(repo, models=["rm-a"], default_model="rm-b"))
    await eng.start()
    try:
        with pytest.raises(Unavailable, match="rm-b"):
            await eng.score(req(text(SHORT)))
    finally:
        await eng.close()


async def test_without_marked_default(tmp_path: Path, repo: Path) -> None:
    root = tmp_path / "models"
    for name in ("rm-b", "orlhf"):
        shutil.copytree(repo / name, root / name)
    one = ScoringEngine(settings(root, models=["orlhf"]))
    await one.start()
    try:  # the only loaded model serves requests that name none
        assert (await one.score(req(text(SHORT)))).model == "orlhf"
    finally:
        await one.close()
    two = ScoringEngine(settings(root))
    await two.start()
    try:
        assert sorted(two.models) == ["orlhf", "rm-b"]
        with pytest.raises(InvalidArgument) as info:
            await two.score(req(text(SHORT)))
        assert info.value.field == "model"
        assert "orlhf" in info.value.message and "rm-b" in info.value.message
    finally:
        await two.close()


# ---- limits ---------------------------------------------------------------------------------


async def test_too_many_items(engine: ScoringEngine) -> None:
    with pytest.raises(InvalidArgument) as info:
        await engine.score(req(*[text("x")] * 5))
    assert info.value.field == "items"
    assert len((await engine.score(req(*[text("x")] * 4))).results) == 4


async def test_too_many_texts_names_the_callers_field(engine: ScoringEngine) -> None:
    with pytest.raises(InvalidArgument) as info:
        await engine.score_texts(None, ["x"] * 5, field_of="query")
    assert info.value.field == "query"


async def test_text_over_max_chars_is_refused_not_truncated(engine: ScoringEngine) -> None:
    with pytest.raises(InvalidArgument) as info:
        await engine.score(req(text("ok"), text("ok"), text("y" * 2001)))
    assert info.value.field == "items.2"
    assert len((await engine.score(req(text("y" * 2000)))).results) == 1


async def test_unknown_model(engine: ScoringEngine) -> None:
    with pytest.raises(NotFound) as info:
        await engine.score(req(text("x"), model="nope"))
    assert info.value.field == "model"


# ---- load / unload -------------------------------------------------------------------------


async def test_load_and_unload_at_run_time(engine: ScoringEngine, repo: Path) -> None:
    sharpen_weights(build_tiny_rm(repo, "rm-new", seed=5, stats=(1.0, 1.0)), 6)
    try:
        assert "rm-new" not in engine.models
        info = await engine.load("rm-new")  # the repository is rescanned first
        assert info.id == "rm-new" and info.status == "loaded" and not info.default
        loaded = engine.models["rm-new"]
        assert (await engine.load("rm-new")).status == "loaded"  # idempotent
        assert engine.models["rm-new"] is loaded
        resp = await engine.score(req(text(SHORT), model="rm-new"))
        assert resp.model == "rm-new"
        assert resp.results[0].reward != (await rewards(engine, [SHORT], "rm-a"))[0]

        info = await engine.unload("rm-new")
        assert info.status == "available"
        assert {m.id: m.status for m in engine.list_models()}["rm-new"] == "available"
        with pytest.raises(NotFound):
            await engine.score(req(text(SHORT), model="rm-new"))
        with pytest.raises(NotFound):
            await engine.unload("rm-new")
    finally:
        if "rm-new" in engine.models:
            await engine.unload("rm-new")


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("nope", NotFound),
        ("policy-x", InvalidArgument),
        ("broken", InvalidArgument),
        ("ghost", Unavailable),
    ],
)
async def test_load_refusals(engine: ScoringEngine, name: str, error: type) -> None:
    with pytest.raises(error) as info:
        await engine.load(name)
    if error is not Unavailable:
        assert info.value.field == "model"
    assert name not in engine.models


# ---- trust_remote_code --------------------------------------------------------------------


@pytest.fixture(scope="module")
def remote_code_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rc-yes asks for trust_remote_code; rc-no carries the same custom code but does not."""
    root = tmp_path_factory.mktemp("remote-code") / "models"
    for name, trust in (("rc-yes", True), ("rc-no", False)):
        build_remote_code_rm(root, name, "out.logits + 1000.0", trust=trust)  # proof it ran
    return root


@pytest.mark.parametrize(("model", "allow"), [("rc-yes", False), ("rc-no", True), ("rc-no", False)])
async def test_remote_code_refused_unless_both_allow(
    remote_code_repo: Path, model: str, allow: bool
) -> None:
    eng = ScoringEngine(settings(remote_code_repo, models=[], allow_trust_remote_code=allow))
    try:
        with pytest.raises(InvalidArgument) as info:
            await eng.load(model)
        assert info.value.field == "model"
        if model == "rc-yes":
            assert "trust_remote_code" in info.value.message
        assert model not in eng.models
    finally:
        await eng.close()


async def test_remote_code_runs_when_both_allow(remote_code_repo: Path) -> None:
    eng = ScoringEngine(settings(remote_code_repo, models=[], allow_trust_remote_code=True))
    try:
        await eng.load("rc-yes")
        (reward,) = await rewards(eng, ["hello"], model="rc-yes")
        assert reward > 900  # the model's own code ran
    finally:
        await eng.close()


async def test_startup_skips_a_model_the_server_may_not_load(tmp_path: Path, repo: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(repo / "rm-b", root / "rm-b")
    shutil.copytree(repo / "rm-b", root / "rm-trust")
    raw = yaml.safe_load((root / "rm-trust" / "model.yaml").read_text())
    raw.update(name="rm-trust", trust_remote_code=True)
    (root / "rm-trust" / "model.yaml").write_text(yaml.safe_dump(raw))
    eng = ScoringEngine(settings(root, allow_trust_remote_code=False))
    try:
        await eng.start()
        assert sorted(eng.models) == ["rm-b"]
    finally:
        await eng.close()


# ---- a model whose batcher loop dies --------------------------------------------------------


@pytest.fixture(scope="module")
def broken_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rc-short answers a batch of k > 1 items with one reward; rm-ok is a sound model."""
    root = tmp_path_factory.mktemp("broken") / "models"
    build_remote_code_rm(root, "rc-short", ROW_DROPPING_LOGITS)
    build_tiny_rm(root, "rm-ok", seed=5, default=True)
    return root


async def until(condition, timeout_s: float = 30.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout_s)


async def test_a_dead_loop_marks_the_model_failed_restarts_and_gives_up(
    broken_repo: Path,
) -> None:
    eng = ScoringEngine(
        settings(
            broken_repo,
            allow_trust_remote_code=True,
            batcher_max_restarts=1,
            batcher_restart_backoff_s=0,
        )
    )
    await eng.start()
    try:
        assert eng.ready and sorted(eng.models) == ["rc-short", "rm-ok"]
        with pytest.raises(Unavailable) as info:
            await asyncio.wait_for(rewards(eng, ["one", "two"], model="rc-short"), 30)
        assert "'rc-short'" in info.value.message
        assert "1 rewards for 2 items" in info.value.message
        # restarted: readiness recovers and the model serves what it can
        await until(lambda: eng.ready)
        assert len(await rewards(eng, ["one"], model="rc-short")) == 1
        assert len(await rewards(eng, ["one", "two"], model="rm-ok")) == 2  # others serve

        with pytest.raises(Unavailable):  # the second death is past the limit of one
            await asyncio.wait_for(rewards(eng, ["one", "two"], model="rc-short"), 30)
        assert not eng.ready
        assert list(eng.failures()) == ["rc-short"] and "gave up" in eng.failures()["rc-short"]
        listed = {m.id: m for m in eng.list_models()}
        assert listed["rc-short"].status == "error"
        assert "1 rewards for 2 items" in (listed["rc-short"].error or "")
        assert listed["rm-ok"].status == "loaded" and listed["rm-ok"].error is None
        with pytest.raises(Unavailable, match="gave up"):  # refused at once, for good
            await asyncio.wait_for(rewards(eng, ["one"], model="rc-short"), 5)
        assert len(await rewards(eng, ["one", "two"], model="rm-ok")) == 2

        info_after = await eng.load("rc-short")  # an admin load is the way back
        assert info_after.status == "loaded" and eng.ready
        assert len(await rewards(eng, ["one"], model="rc-short")) == 1
    finally:
        await eng.close()


async def test_unloading_a_failed_model_makes_the_service_ready(broken_repo: Path) -> None:
    eng = ScoringEngine(
        settings(
            broken_repo,
            allow_trust_remote_code=True,
            batcher_max_restarts=0,
            batcher_restart_backoff_s=0,
        )
    )
    await eng.start()
    try:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(rewards(eng, ["one", "two"], model="rc-short"), 30)
        assert not eng.ready
        await eng.unload("rc-short")
        assert eng.ready and eng.failures() == {}
    finally:
        await eng.close()


async def test_a_request_larger_than_the_queue_is_a_400_naming_its_field(repo: Path) -> None:
    eng = ScoringEngine(settings(repo, models=["rm-a"], max_queue_items=2))
    await eng.start()
    try:
        with pytest.raises(InvalidArgument) as info:
            await eng.score_texts("rm-a", [SHORT] * 3, field_of="query")
        assert info.value.field == "query" and "at most 2" in info.value.message
        with pytest.raises(InvalidArgument) as info:
            await eng.score(req(*(text(SHORT) for _ in range(3)), model="rm-a"))
        assert info.value.field == "items"
        # Best-of-N does its own admission: its scorer never refuses it for queue size
        _, _, got = await eng.score_texts("rm-a", [SHORT] * 3, enforce_queue_limit=False)
        assert len(got) == 3
    finally:
        await eng.close()
