"""ModelRepository: names, aliases, start-up sets and defaults of both kinds, asked by the
scoring engine and the policy manager alike (no weights are loaded here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from policies import CategoricalPolicy
from rewardserve.config import Settings
from rewardserve.policy.manager import PolicyManager
from rewardserve.registry.repository import ModelRepository, scan_repository
from rewardserve.schemas.errors import InvalidArgument, NotFound, Unavailable

RM_PATH = "/data/checkpoints/Skywork-Reward-V2-Llama-3.1-8B"
RM_HUB = "Skywork/Skywork-Reward-V2-Llama-3.1-8B"


def model(root: Path, name: str, kind: str = "reward", *, weights: bool = True, **fields) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    if weights:
        (folder / "weights").mkdir()
    raw = {"name": name, "kind": kind, "source": {"kind": "repository", "path": "weights"}}
    (folder / "model.yaml").write_text(yaml.safe_dump(raw | fields))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    model(root, "rm-a", default=True, aliases=[RM_PATH, RM_HUB])
    model(root, "rm-b", aliases=["rm-b-v2"])
    model(root, "ghost", weights=False)
    model(root, "pol", "policy", default=True, aliases=["HuggingFaceTB/SmolLM2-135M-Instruct"])
    model(root, "pol-2", "policy", weights=False, aliases=["org/pol-2"])
    return root


def settings(root: Path, **fields: object) -> Settings:
    return Settings(model_repository=root, cache_dir=root.parent / "cache", **fields)


def repo(root: Path, **fields: object) -> ModelRepository:
    return ModelRepository.from_settings(settings(root, **fields))


def test_aliases_resolve_to_the_model_name(root: Path) -> None:
    r = repo(root)
    loaded = {"rm-a", "rm-b"}
    assert r.resolve("reward", RM_PATH, loaded) == "rm-a"
    assert r.resolve("reward", RM_HUB, loaded) == "rm-a"
    assert r.resolve("reward", "rm-a", loaded) == "rm-a"
    assert r.resolve("reward", "rm-b-v2", loaded) == "rm-b"
    assert r.resolve("policy", "HuggingFaceTB/SmolLM2-135M-Instruct", {"pol"}) == "pol"
    assert r.canonical("not-an-alias") == "not-an-alias"
    # exact match, as vLLM's --served-model-name: no path normalisation or case folding
    with pytest.raises(NotFound) as info:
        r.resolve("reward", RM_PATH + "/", loaded)
    assert info.value.field == "model"
    with pytest.raises(NotFound):
        r.resolve("reward", RM_HUB.lower(), loaded)


def test_an_alias_of_another_kind_is_not_found(root: Path) -> None:
    r = repo(root)
    with pytest.raises(NotFound) as info:
        r.resolve("reward", "HuggingFaceTB/SmolLM2-135M-Instruct", {"rm-a"})
    assert info.value.field == "model"
    with pytest.raises(NotFound) as info:
        r.resolve("policy", RM_HUB, {"pol"})
    assert info.value.field == "policy"


def test_startup_sets_of_both_kinds(root: Path) -> None:
    r = repo(root)
    assert r.startup_set("reward") == ["rm-a", "rm-b"]  # ghost has no weights
    assert r.startup_set("policy") == ["pol"]
    named = repo(root, models=[RM_HUB, "rm-b"], policies=["org/pol-2"])
    assert named.startup_set("reward") == ["rm-a", "rm-b"]  # aliases become names
    assert named.startup_set("policy") == ["pol-2"]


def test_defaults_of_both_kinds(root: Path) -> None:
    r = repo(root)
    assert r.default_name("reward", {"rm-b"}) == "rm-a"  # marked, even when not loaded
    assert r.default_name("policy", set()) == "pol"
    assert repo(root, default_model="rm-b-v2").default_name("reward", {"rm-a"}) == "rm-b"
    (root / "rm-a" / "model.yaml").write_text(
        (root / "rm-a" / "model.yaml").read_text().replace("default: true", "default: false")
    )
    r.rescan()
    assert r.default_name("reward", {"rm-b"}) == "rm-b"  # the only loaded one
    assert r.default_name("reward", {"rm-a", "rm-b"}) is None


@pytest.mark.parametrize("kind", ["reward", "policy"])
def test_refusals_say_the_same_for_both_kinds(root: Path, kind: str) -> None:
    r = repo(root)
    r.startup_set(kind)  # type: ignore[arg-type]
    field = "model" if kind == "reward" else "policy"
    noun = "reward model" if kind == "reward" else "policy"
    with pytest.raises(NotFound) as nf:
        r.resolve(kind, "nope", {"x"})  # type: ignore[arg-type]
    assert nf.value.field == field and "'nope'" in nf.value.message and noun in nf.value.message
    without_weights = "ghost" if kind == "reward" else "org/pol-2"
    with pytest.raises(Unavailable, match="weights are not built"):
        r.resolve(kind, without_weights, {"x"})  # type: ignore[arg-type]
    default = "rm-a" if kind == "reward" else "pol"
    with pytest.raises(Unavailable, match=f"the default {noun} '{default}' is not loaded"):
        r.resolve(kind, None, {"x"})  # type: ignore[arg-type]


def test_no_default_names_the_loaded_models(tmp_path: Path) -> None:
    root = tmp_path / "models"
    model(root, "rm-x")
    r = repo(root)
    with pytest.raises(InvalidArgument) as info:
        r.resolve("reward", None, {"rm-x", "rm-y"})
    assert info.value.field == "model" and "rm-x, rm-y" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        r.resolve("policy", None, set())
    assert info.value.field == "policy" and "none" in info.value.message
    assert r.resolve("reward", None, {"rm-x"}) == "rm-x"


def test_failures_are_the_reason_given(root: Path) -> None:
    with pytest.raises(Unavailable, match="policy 'pol' is not available: engine died"):
        repo(root).resolve("policy", "pol", set(), {"pol": "engine died"})


# ---- clashes ------------------------------------------------------------------------------


def test_alias_that_is_another_models_name_is_a_bad_manifest(tmp_path: Path) -> None:
    root = tmp_path / "models"
    model(root, "rm-a")
    model(root, "rm-b", aliases=["fine", "rm-a"])
    entries = scan_repository(root)
    assert entries["rm-a"].manifest is not None  # the model whose name it is keeps serving
    assert entries["rm-b"].manifest is None
    error = entries["rm-b"].error or ""
    assert "field 'aliases'" in error and "'rm-a'" in error
    assert str(root / "rm-b" / "model.yaml") in error


def test_alias_claimed_twice_is_refused_on_both(tmp_path: Path) -> None:
    root = tmp_path / "models"
    model(root, "rm-a", aliases=[RM_HUB])
    model(root, "pol", "policy", aliases=[RM_HUB])  # across kinds too: one namespace
    model(root, "rm-c", aliases=["other"])
    r = repo(root)
    for name, other in (("rm-a", "'pol'"), ("pol", "'rm-a'")):
        assert r.entries[name].manifest is None
        error = r.entries[name].error or ""
        assert "field 'aliases'" in error and RM_HUB in error and other in error
    assert r.entries["rm-c"].manifest is not None
    assert r.startup_set("reward") == ["rm-c"]
    with pytest.raises(NotFound):  # an ambiguous name serves neither
        r.resolve("reward", RM_HUB, {"rm-c"})


def test_alias_clash_with_a_broken_manifests_folder(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "broken").mkdir(parents=True)
    (root / "broken" / "model.yaml").write_text("name: broken\nkind: [reward\n")
    model(root, "rm-a", aliases=["broken"])
    assert "field 'aliases'" in (scan_repository(root)["rm-a"].error or "")


# ---- the policy manager asks the same repository ------------------------------------------


async def test_policy_manager_resolves_aliases_and_defaults(root: Path) -> None:
    manager = PolicyManager(settings(root), repo(root))
    policy = CategoricalPolicy(["a"], [1.0], name="pol")
    manager.loaded["pol"] = policy
    assert manager.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") is policy
    assert manager.resolve(None) is policy
    assert manager.default_name() == "pol"
    policy.failure = "the engine died"
    with pytest.raises(Unavailable, match="the engine died"):
        manager.resolve("pol")


def test_the_reason_is_asked_now_not_remembered(root: Path) -> None:
    r = repo(root)
    assert "rm-a" in r.startup_set("reward") and "ghost" not in r.startup_set("reward")
    with pytest.raises(Unavailable, match="weights are not built"):
        r.resolve("reward", "ghost", {"rm-a"})
    (root / "ghost" / "weights").mkdir()  # built since: merely not loaded now
    with pytest.raises(NotFound, match="'ghost' is not loaded"):
        r.resolve("reward", "ghost", {"rm-a"})


def test_the_repository_imports_no_torch() -> None:
    code = "import sys, rewardserve.registry.repository; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
