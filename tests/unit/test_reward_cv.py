"""Honest reward-model evaluation: grouped splits and folds, normalization from held-out
rewards, cross-validation, recipe selection on data kept apart from the test split, and
ensembles in the layout the repository serves. A tiny random BERT, synthetic pairs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel
from typer.testing import CliRunner

from builders import minilm_dir, tiny_config
from rewardserve.cli import app
from rewardserve.engine.inputs import encode_texts
from rewardserve.training.reward.config import RewardTrainingConfig
from rewardserve.training.reward.cv import train_cross_validated
from rewardserve.training.reward.data import (
    PairDataError,
    PreferencePair,
    bootstrap_indices,
    capped_indices,
    group_key,
    grouped_folds,
    grouped_split,
    load_pairs,
    pair_groups,
    split_indices,
    split_pairs,
)
from rewardserve.training.reward.ensemble import (
    ENSEMBLE_FILE,
    MANIFEST_SNIPPET,
    ensemble_evaluation,
    manifest_section,
    train_ensemble,
)
from rewardserve.training.reward.recipes import (
    RecipeError,
    load_recipes,
    render_markdown,
    search_recipes,
)
from rewardserve.training.reward.run import run_reward_training
from rewardserve.training.reward.stats import accuracy_summary, cluster_bootstrap_interval
from rewardserve.training.reward.trainer import score_encoded, train_reward_model

TOPICS = ["cooking", "taxes", "gardening", "chess", "poetry", "running", "music", "travel"]


def synthetic_pairs(n_conversations: int, seed: int = 0) -> list[PreferencePair]:
    """Conversations of 1-3 pairs that fork after their first Human turn (as HH-RLHF's do):
    the siblings share the opening question, differ later, and prefer 'helpful' to 'rude'."""
    rng = random.Random(seed)
    pairs = []
    for c in range(n_conversations):
        opener = f"tell me about {rng.choice(TOPICS)} number {c}"
        for fork in range(rng.choice([1, 1, 2, 3])):
            prompt = f"\n\nHuman: {opener}\n\nAssistant: sure.\n\nHuman: and part {fork}?"
            pairs.append(
                PreferencePair(
                    chosen=f"{prompt}\n\nAssistant: here is a helpful answer",
                    rejected=f"{prompt}\n\nAssistant: here is a rude answer",
                )
            )
    rng.shuffle(pairs)  # siblings scattered through the file
    return pairs


def write_pairs(path: Path, pairs: list[PreferencePair]) -> Path:
    path.write_text(
        "".join(json.dumps({"chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs)
    )
    return path


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT without a head (training adds a fresh, seeded one)."""
    folder = tmp_path_factory.mktemp("tiny-backbone")
    torch.manual_seed(0)
    BertModel(tiny_config()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", synthetic_pairs(40))


def config(backbone: Path, data: Path, output: Path, **overrides: Any) -> RewardTrainingConfig:
    fields: dict[str, Any] = {
        "base_model": backbone, "data": data, "output": output, "max_length": 48,
        "eval_fraction": 0.25, "epochs": 2, "batch_size": 8, "learning_rate": 3e-3,
        "torch_threads": 1, "eval_batch_size": 32, "eval_each_epoch": False,
    }  # fmt: skip
    return RewardTrainingConfig(**(fields | overrides))


def groups_of(pairs: list[PreferencePair], indices: list[int]) -> set[str]:
    return {group_key(pairs[i]) for i in indices}


# -- grouping ---------------------------------------------------------------------------------


def test_group_key_is_the_first_human_turn_normalised() -> None:
    prompt = "\n\nHuman:  How do I  bake?\n\nAssistant: x\n\nHuman: more\n\nAssistant:"
    a = PreferencePair(f"{prompt} y", f"{prompt} z")
    b = PreferencePair("\n\nHuman: how do i bake?\n\nAssistant: other", "rejected")
    c = PreferencePair("\n\nHuman: how do I cook?\n\nAssistant: x", "y")
    assert group_key(a) == group_key(b) == "how do i bake?"
    assert group_key(c) != group_key(a)
    assert group_key(PreferencePair("no turns at all", "r")) == "no turns at all"
    assert pair_groups([a, c, b]) == [0, 1, 0]


def test_grouped_split_never_straddles_and_is_seeded() -> None:
    pairs = synthetic_pairs(60, seed=1)
    groups = pair_groups(pairs)
    assert len(set(groups)) == 60 < len(pairs)
    for seed in range(20):
        for fraction in (0.01, 0.1, 0.25, 0.5):
            train, held = split_indices(pairs, fraction, seed)
            assert sorted(train + held) == list(range(len(pairs)))
            assert not groups_of(pairs, train) & groups_of(pairs, held)
            assert held and train
            assert abs(len(held) - round(len(pairs) * fraction)) <= 2  # groups of <= 3
            assert split_indices(pairs, fraction, seed) == (train, held)
    assert split_indices(pairs, 0.2, 0) != split_indices(pairs, 0.2, 1)
    assert split_indices(pairs, 0.0, 0)[1] == []
    # split_pairs is the same split, as pairs; the cap keeps whole groups apart too
    train, held = split_indices(pairs, 0.2, 3, max_pairs=40)
    assert split_pairs(pairs, 0.2, 3, max_pairs=40) == (
        [pairs[i] for i in train],
        [pairs[i] for i in held],
    )
    assert len(train) + len(held) == 40 and not groups_of(pairs, train) & groups_of(pairs, held)


def test_one_conversation_cannot_be_split() -> None:
    same = [PreferencePair("\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: hi\n\nAssistant: no")]
    train, held = grouped_split(pair_groups(same * 5), list(range(5)), 0.2, 0)
    assert (len(train), held) == (5, [])  # nothing can be held out without straddling


def test_folds_partition_by_group_and_repeat_with_the_seed() -> None:
    pairs = synthetic_pairs(50, seed=2)
    groups = pair_groups(pairs)
    used = capped_indices(len(pairs), 0, None)
    folds = grouped_folds(groups, used, 5, seed=7)
    assert len(folds) == 5
    assert sorted(i for f in folds for i in f) == used
    keys = [groups_of(pairs, f) for f in folds]
    assert all(not keys[a] & keys[b] for a in range(5) for b in range(a + 1, 5))
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 3  # balanced to within the largest group
    assert grouped_folds(groups, used, 5, seed=7) == folds
    assert grouped_folds(groups, used, 5, seed=8) != folds
    with pytest.raises(PairDataError, match="6 folds need at least 6 conversations"):
        grouped_folds([0, 0, 1, 2, 3, 4], list(range(6)), 6, seed=0)


def test_bootstrap_draws_whole_groups_of_the_given_pairs_only() -> None:
    pairs = synthetic_pairs(60, seed=3)
    groups = pair_groups(pairs)
    train, _ = grouped_split(groups, list(range(len(pairs))), 0.25, 0)
    sample = bootstrap_indices(groups, train, seed=5)
    assert set(sample) <= set(train)  # never a held-out pair
    drawn = [groups[i] for i in sample]
    for g in set(drawn):  # a drawn group brings every pair it has, as often as it was drawn
        size = sum(1 for i in train if groups[i] == g)
        assert drawn.count(g) % size == 0
    n_groups = len({groups[i] for i in train})
    assert 0.4 * n_groups < len(set(drawn)) < 0.85 * n_groups  # about 63 % appear
    assert len(set(sample)) < len(sample)  # with replacement
    assert bootstrap_indices(groups, train, seed=5) == sample
    assert bootstrap_indices(groups, train, seed=6) != sample


# -- intervals --------------------------------------------------------------------------------


def test_cluster_bootstrap_is_seeded_and_wider_for_correlated_pairs() -> None:
    rng = random.Random(0)
    # 100 conversations of 4 pairs each, the 4 pairs all right or all wrong: 400 outcomes
    # that carry the information of 100
    per_group = [rng.random() < 0.7 for _ in range(100)]
    correct = [c for c in per_group for _ in range(4)]
    grouped = [g for g in range(100) for _ in range(4)]
    low, high = cluster_bootstrap_interval(correct, grouped, seed=3)
    assert cluster_bootstrap_interval(correct, grouped, seed=3) == (low, high)
    acc = sum(correct) / len(correct)
    assert low < acc < high
    naive_low, naive_high = cluster_bootstrap_interval(correct, list(range(400)), seed=3)
    assert (high - low) > 1.6 * (naive_high - naive_low)  # ~2x: sqrt of the group size
    assert cluster_bootstrap_interval([True] * 5, [0, 1, 2, 3, 4]) == (1.0, 1.0)
    summary = accuracy_summary(correct, grouped)
    assert summary["accuracy"] == acc and summary["groups"] == 100 and summary["pairs"] == 400


# -- normalization ----------------------------------------------------------------------------


def _score(folder: Path, texts: list[str], max_length: int) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.truncation_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    encoded = encode_texts(tokenizer, texts, max_length)
    return score_encoded(model, encoded, tokenizer.pad_token_id, 16)


@pytest.mark.parametrize("eval_fraction", [0.25, 0.0])
def test_mean_and_std_come_from_held_out_rewards_or_all_pairs(
    backbone: Path, data: Path, tmp_path: Path, eval_fraction: float
) -> None:
    cfg = config(backbone, data, tmp_path / "rm", eval_fraction=eval_fraction, stats_max_pairs=4)
    report = train_reward_model(cfg, progress=False)
    train, held = split_pairs(load_pairs(data), eval_fraction, cfg.seed)
    source = held if eval_fraction else train
    assert report["normalization"] == {
        "source": "held_out" if eval_fraction else "all_pairs",
        "pairs": len(source),
    }
    assert report["stats_pairs"] == (4 if eval_fraction else len(train))
    rewards = _score(tmp_path / "rm", [t for p in source for t in (p.chosen, p.rejected)], 48)
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved["mean"] == pytest.approx(float(rewards.mean()), abs=1e-5)
    assert saved["std"] == pytest.approx(float(rewards.std()), rel=1e-4)
    assert (saved["mean"], saved["std"]) == (report["reward_mean"], report["reward_std"])


# -- cross-validation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cv_run(backbone: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    output = tmp_path_factory.mktemp("cv") / "rm"
    cfg = config(backbone, data, output, cv_folds=3)
    return {"report": run_reward_training(cfg, progress=False), "output": output, "cfg": cfg}


def test_cv_report_pools_every_pair_once(cv_run: dict, data: Path) -> None:
    report, cfg = cv_run["report"], cv_run["cfg"]
    pairs = load_pairs(data)
    cv = report["cv"]
    assert cv["folds"] == 3 and len(cv["per_fold"]) == 3
    oof = cv["out_of_fold"]
    assert sorted(o["index"] for o in oof) == list(range(len(pairs)))  # each pair once
    assert cv["accuracy"] == sum(o["margin"] > 0 for o in oof) / len(oof)
    assert cv["pairs"] == len(pairs) and cv["groups"] == 40
    low, high = cv["interval"]
    assert 0.0 <= low <= cv["accuracy"] <= high <= 1.0
    groups = pair_groups(pairs)
    folds = grouped_folds(groups, list(range(len(pairs))), 3, cfg.seed)
    for f, fold in enumerate(cv["per_fold"]):
        in_fold = [o for o in oof if o["fold"] == f]
        assert sorted(o["index"] for o in in_fold) == sorted(folds[f])
        assert fold["pairs"] == len(in_fold)
        assert fold["train_pairs"] == len(pairs) - len(in_fold)
        assert fold["accuracy"] == sum(o["margin"] > 0 for o in in_fold) / len(in_fold)
        assert fold["seconds"] > 0
    assert report["accuracy_estimate"]["accuracy"] == cv["accuracy"]
    assert cv["accuracy"] > 0.7  # the preference is easy; chance is 0.5


def test_cv_final_model_is_trained_on_every_pair_and_served(cv_run: dict, data: Path) -> None:
    output, report = cv_run["output"], cv_run["report"]
    assert report["train_pairs"] == len(load_pairs(data)) and report["eval_pairs"] == 0
    assert report["normalization"]["source"] == "all_pairs"
    saved = json.loads((output / "config.json").read_text())
    assert saved["mean"] == report["reward_mean"]
    on_disk = json.loads((output / "training_report.json").read_text())
    assert on_disk["cv"]["accuracy"] == report["cv"]["accuracy"]
    assert (output / "model.safetensors").exists()


def test_cv_without_final_writes_only_the_report(
    backbone: Path, data: Path, tmp_path: Path
) -> None:
    cfg = config(backbone, data, tmp_path / "rm", cv_folds=2, cv_final=False, max_pairs=24,
                 epochs=1)  # fmt: skip
    report = train_cross_validated(cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "rm").iterdir()) == ["training_report.json"]
    assert len(report["cv"]["out_of_fold"]) == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]


def test_cv_and_ensemble_do_not_combine(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cv_folds and ensemble"):
        RewardTrainingConfig(base_model=tmp_path, data=tmp_path, output=tmp_path, cv_folds=3,
                             ensemble=2)  # fmt: skip
    with pytest.raises(ValidationError, match=r"bootstrap .* needs ensemble >= 2"):
        RewardTrainingConfig(base_model=tmp_path, data=tmp_path, output=tmp_path, bootstrap=True)
    with pytest.raises(ValueError, match="run_reward_training"):
        train_reward_model(config(tmp_path, tmp_path, tmp_path, ensemble=2), progress=False)


# -- recipe search ----------------------------------------------------------------------------


def _recipes(tmp_path: Path, body: Any) -> Path:
    path = tmp_path / "recipes.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_recipe_search_tests_the_chosen_recipe_on_pairs_it_never_saw(
    backbone: Path, data: Path, tmp_path: Path
) -> None:
    base = {"base_model": backbone, "data": data, "output": tmp_path / "unused",
            "max_length": 48, "batch_size": 8, "torch_threads": 1,
            "eval_each_epoch": False}  # fmt: skip
    body = {"slow": {"learning_rate": 1e-5, "epochs": 1}, "fast": {"learning_rate": 3e-3}}
    recipes = load_recipes(_recipes(tmp_path, body), base)
    report = search_recipes(data, recipes, folds=2, test_fraction=0.25, seed=1, max_pairs=60,
                            progress=False)  # fmt: skip
    pairs = load_pairs(data)
    test, dev = set(report["test_pairs"]), set(report["dev_pairs"])
    assert test and not test & dev and len(test | dev) == 60
    assert not groups_of(pairs, list(test)) & groups_of(pairs, list(dev))
    for row in report["recipes"]:
        scored = {o["index"] for o in row["cv"]["out_of_fold"]}
        assert scored == dev  # every recipe is scored on the development pairs only
    assert [r["name"] for r in report["recipes"]] == ["slow", "fast"]
    best = max(report["recipes"], key=lambda r: r["cv"]["accuracy"])
    assert report["chosen"] == best["name"]
    assert report["recipes"][1]["recipe"]["learning_rate"] == 3e-3
    assert report["test"]["pairs"] == len(test) == len(report["test"]["margins"])
    assert report["test"]["accuracy"] == (sum(m > 0 for m in report["test"]["margins"]) / len(test))
    md = render_markdown(report)
    assert "| slow" in md and "| fast" in md and f"Chosen: **{report['chosen']}**" in md
    slow = report["recipes"][0]["cv"]["per_fold"]
    assert f"| {sum(f['seconds'] for f in slow) / 2:.0f} |" in md  # the mean seconds a fold


def test_a_stopped_search_resumes_from_the_recipes_it_finished(
    backbone: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rewardserve.training.reward.recipes as recipes_module

    base = {"base_model": backbone, "data": data, "output": tmp_path / "unused",
            "max_length": 48, "batch_size": 8, "torch_threads": 1,
            "eval_each_epoch": False}  # fmt: skip
    body = {"a": {"learning_rate": 1e-3}, "b": {"learning_rate": 3e-3}}
    recipes = load_recipes(_recipes(tmp_path, body), base)
    ran: list[str] = []
    real = recipes_module.cross_validate

    def counted(cfg: Any, *args: Any, label: str = "", **kw: Any) -> Any:  # spy, the real CV
        ran.append(label)
        return real(cfg, *args, label=label, **kw)

    monkeypatch.setattr(recipes_module, "cross_validate", counted)
    done = tmp_path / "cv"
    args = {"folds": 2, "test_fraction": 0.25, "seed": 1, "max_pairs": 40, "progress": False}
    first = search_recipes(data, recipes, done_dir=done, **args)
    assert ran == ["a", "b"] and sorted(p.name for p in done.iterdir()) == ["a.json", "b.json"]
    (done / "b.json").write_text('{"key": "trunc')  # killed while writing b: b runs again
    again = search_recipes(data, recipes, done_dir=done, **args)
    assert ran == ["a", "b", "b"]

    def outcomes(report: dict) -> list:  # all but the seconds each fold took
        rows = json.loads(json.dumps(report["recipes"]))
        for row in rows:
            for fold in row["cv"]["per_fold"]:
                fold.pop("seconds")
        return rows

    assert outcomes(again) == outcomes(first)  # a's kept CV, b's rerun, same as before
    assert again["recipes"][0] == first["recipes"][0]  # a's kept as it was, seconds too
    changed = load_recipes(_recipes(tmp_path, {"a": {"learning_rate": 2e-3}}), base)
    search_recipes(data, changed, done_dir=done, **args)  # another recipe under a's name
    assert ran == ["a", "b", "b", "a"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"a": {"lr": 0.1}}, r"recipe 'a': field 'lr': Extra inputs"),
        ({"a": {"epochs": 0}}, r"recipe 'a': field 'epochs':"),
        ({"a": {"data": "x.jsonl"}}, r"recipe 'a': field 'data' is set by the search"),
        ({"a": {"ensemble": 3}}, r"recipe 'a': field 'ensemble' is set by the search"),
        ([{"name": "b", "warmup_ratio": 2}], r"recipe 'b': field 'warmup_ratio':"),
        ({"a": [1, 2]}, r"recipe 'a': expected a mapping of fields, got list"),
        ("just text", r"expected a mapping of recipe names"),
        ({}, r"no recipes"),
    ],
)
def test_bad_recipe_files_name_the_recipe_and_field(
    tmp_path: Path, body: Any, message: str
) -> None:
    base = {"base_model": tmp_path, "data": tmp_path, "output": tmp_path}
    with pytest.raises(RecipeError, match=message):
        load_recipes(_recipes(tmp_path, body), base)


def test_rm_recipes_command_refuses_a_bad_recipe_file(tmp_path: Path, data: Path) -> None:
    recipes = _recipes(tmp_path, {"a": {"learning_rat": 0.1}})
    args = ["rm-recipes", "--data", str(data), "--recipes", str(recipes),
            "--base-model", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "field 'learning_rat'" in result.output


# -- ensembles --------------------------------------------------------------------------------


def test_ensemble_evaluation_splits_by_uncertainty() -> None:
    # members x pairs: pairs 0-1 agreed on (one right, one wrong), pairs 2-3 disputed (right)
    margins = torch.tensor([[1.0, -1.0, 3.0, 2.0], [1.1, -0.9, -1.0, 0.5]])
    ev = ensemble_evaluation(margins, [0, 1, 2, 3], seed=0)
    assert ev["accuracy"] == 0.75
    assert ev["uncertainty"]["confident_half"] == {"pairs": 2, "accuracy": 0.5}
    assert ev["uncertainty"]["less_confident_half"] == {"pairs": 2, "accuracy": 1.0}


def test_ensemble_layout_loads_and_members_differ(
    backbone: Path, data: Path, tmp_path: Path
) -> None:
    output = tmp_path / "ens"
    cfg = config(backbone, data, output, ensemble=3, max_pairs=48, epochs=1)
    report = train_ensemble(cfg, progress=False)
    folders = ["members/0", "members/1", "members/2"]
    assert json.loads((output / ENSEMBLE_FILE).read_text()) == {
        "members": folders, "combine": "normalized"
    }  # fmt: skip
    assert yaml.safe_load((output / MANIFEST_SNIPPET).read_text()) == manifest_section(folders)
    assert report["manifest"] == manifest_section(folders)
    heads = []
    for m, folder in enumerate(folders):
        member = output / folder
        saved = json.loads((member / "config.json").read_text())
        member_report = json.loads((member / "training_report.json").read_text())
        assert saved["mean"] == member_report["reward_mean"] == report["members"][m]["reward_mean"]
        assert member_report["normalization"]["source"] == "held_out"
        assert member_report["member_seed"] == cfg.seed + m
        model = AutoModelForSequenceClassification.from_pretrained(member)
        heads.append(model.classifier.weight.detach().clone())
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    # one split for all members
    assert {r["eval_accuracy"] is not None for r in report["members"]} == {True}
    assert report["eval_pairs"] == len(split_pairs(load_pairs(data), 0.25, 0, 48)[1])
    ev = report["evaluation"]
    halves = ev["uncertainty"]
    assert (
        halves["confident_half"]["pairs"] + halves["less_confident_half"]["pairs"]
        == (report["eval_pairs"])
    )
    assert report["eval_accuracy"] == ev["accuracy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]


def test_bootstrap_members_train_on_their_own_resamples(
    backbone: Path, data: Path, tmp_path: Path
) -> None:
    cfg = config(backbone, data, tmp_path / "bag", ensemble=2, bootstrap=True, max_pairs=48,
                 epochs=1)  # fmt: skip
    report = train_ensemble(cfg, progress=False)
    pairs = load_pairs(data)
    train, held = split_indices(pairs, 0.25, 0, 48)
    for m, member in enumerate(report["members"]):
        drawn = bootstrap_indices(pair_groups(pairs), train, cfg.seed + m)
        assert member["train_pairs"] == len(drawn)
        assert member["distinct_train_pairs"] == len(set(drawn)) < len(train)
    assert report["eval_pairs"] == len(held)  # the held-out split is the members' common one


def test_train_rm_cli_cv_flag(backbone: Path, data: Path, tmp_path: Path) -> None:
    args = ["train-rm", "--base-model", str(backbone), "--data", str(data),
            "--output", str(tmp_path / "rm"), "--cv", "2", "--no-cv-final", "--max-pairs", "20",
            "--max-length", "32", "--torch-threads", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rm" / "training_report.json").read_text())
    assert report["cv"]["folds"] == 2 and report["config"]["cv_final"] is False
