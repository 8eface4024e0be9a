"""Choosing a training recipe without reporting a figure tuned on its own test data.

A grouped test split is held out first and never looked at while choosing. Each recipe (a
partial RewardTrainingConfig) is scored by grouped k-fold cross-validation on the rest (the
development pairs, the same folds for every recipe); the best is retrained on all
development pairs and its accuracy measured once on the test split. That test figure is
the honest one; the CV scores only rank recipes (the best of many is optimistically biased).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rewardserve.training.reward.config import RewardTrainingConfig
from rewardserve.training.reward.cv import cross_validate
from rewardserve.training.reward.data import (
    PairDataError,
    capped_indices,
    grouped_split,
    load_pairs,
    pair_groups,
)
from rewardserve.training.reward.stats import accuracy_summary
from rewardserve.training.reward.trainer import fit, make_progress, torch_threads

# Set by the search itself, so a recipe may not: what data, which split, what kind of run.
SEARCH_FIELDS = ("data", "output", "eval_fraction", "max_pairs", "cv_folds", "cv_final",
                 "ensemble")  # fmt: skip
REPORT_JSON = "recipes_report.json"
REPORT_MD = "recipes_report.md"


class RecipeError(ValueError):
    """A recipe file that cannot be used; the message names the file, recipe and field."""


def load_recipes(path: Path, base: dict[str, Any]) -> dict[str, RewardTrainingConfig]:
    """Recipes by name from a YAML file: a mapping name -> fields, or a list of field
    mappings (each may carry a "name"; otherwise recipe-<i>). Each is validated as a whole
    config over `base` (fields every recipe shares, such as base_model), so a misspelt field
    or a bad value is refused before any training."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from None
    if isinstance(raw, list):
        entries: list[tuple[str, Any]] = []
        for i, item in enumerate(raw):
            name = item.pop("name", f"recipe-{i}") if isinstance(item, dict) else f"recipe-{i}"
            entries.append((str(name), item))
    elif isinstance(raw, dict):
        entries = [(str(k), v) for k, v in raw.items()]
    else:
        raise RecipeError(f"{path}: expected a mapping of recipe names to fields, or a list")
    if not entries:
        raise RecipeError(f"{path}: no recipes in the file")
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):
        raise RecipeError(f"{path}: recipe names repeat: {names}")
    recipes: dict[str, RewardTrainingConfig] = {}
    for name, fields in entries:
        where = f"{path}: recipe '{name}'"
        if fields is None:
            fields = {}
        if not isinstance(fields, dict):
            raise RecipeError(f"{where}: expected a mapping of fields, got {type(fields).__name__}")
        for key in SEARCH_FIELDS:
            if key in fields:
                raise RecipeError(f"{where}: field '{key}' is set by the search, not a recipe")
        try:
            recipes[name] = RewardTrainingConfig.model_validate(base | fields)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(recipe)"
            raise RecipeError(f"{where}: field '{loc}': {first['msg']}") from None
    return recipes


def search_recipes(
    data: Path,
    recipes: dict[str, RewardTrainingConfig],
    *,
    folds: int = 5,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_pairs: int | None = None,
    torch_threads_n: int | None = None,
    progress: bool = True,
    done_dir: Path | None = None,
) -> dict[str, Any]:
    """The search (see the module's doc); returns the report (render_markdown shows it).

    The report lists the test pairs' and the development pairs' indices into the file, so
    anyone can check that no test pair was used to choose the recipe. With `done_dir`, each
    recipe's cross-validation is kept there as it finishes and reused by a later search of the
    same file, split and recipe, so a stopped search resumes where it was.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    started = time.perf_counter()
    pairs = load_pairs(data)
    groups = pair_groups(pairs)
    used = capped_indices(len(pairs), seed, max_pairs)
    dev, test = grouped_split(groups, used, test_fraction, seed)
    if not test:
        raise PairDataError("the test split is empty: too few conversations for test_fraction")
    rows: list[dict[str, Any]] = []
    with torch_threads(torch_threads_n), make_progress(progress) as bar:
        task = bar.add_task("recipes", total=len(recipes), stats="")
        for name, cfg in recipes.items():
            fields = cfg.model_dump(mode="json", exclude_unset=True)
            fields = {k: v for k, v in fields.items() if k not in SEARCH_FIELDS}
            key = _cv_key(cfg, data, len(pairs), dev, folds, seed)
            cv = _kept(done_dir, name, key)
            if cv is None:
                cv = cross_validate(cfg, pairs, dev, groups, folds, bar, fold_seed=seed,
                                    label=name)  # fmt: skip
                _keep(done_dir, name, key, cv)
            rows.append({"name": name, "recipe": fields, "cv": cv})
            bar.update(task, advance=1, stats=f"{name} {cv['accuracy']:.3f}")
        bar.remove_task(task)
        best = max(rows, key=lambda r: r["cv"]["accuracy"])  # max keeps the first of ties
        chosen = recipes[best["name"]]
        fitted = fit(chosen, [pairs[i] for i in dev], [pairs[i] for i in test], bar,
                     label=f"{best['name']} on all development pairs")  # fmt: skip
    margins = (fitted.eval_chosen_rewards - fitted.eval_rejected_rewards).tolist()
    test_summary = accuracy_summary([m > 0 for m in margins], [groups[i] for i in test],
                                    seed=seed)  # fmt: skip
    return {
        "data": str(data),
        "pairs": len(used),
        "seed": seed,
        "folds": folds,
        "test_fraction": test_fraction,
        "selection": "the recipe with the best grouped cross-validated accuracy on the "
        "development pairs; the test pairs were held out (by conversation) before any "
        "recipe was trained and are scored once, by the chosen recipe only",
        "chosen": best["name"],
        "chosen_recipe": best["recipe"],
        "test": test_summary | {"margins": margins},
        "recipes": rows,
        "dev_pairs": sorted(dev),
        "test_pairs": sorted(test),
        "seconds": time.perf_counter() - started,
    }


def _cv_key(
    cfg: RewardTrainingConfig, data: Path, n_pairs: int, dev: list[int], folds: int, seed: int
) -> str:
    """What a kept cross-validation must match to be reused: the whole recipe (defaults
    filled in), the file's bytes, the development pairs, the folds and their seed."""
    recipe = cfg.model_dump(mode="json", exclude={"output", "torch_threads"})
    digest = hashlib.sha256(Path(data).read_bytes()).hexdigest()
    body = {"recipe": recipe, "data": digest, "pairs": n_pairs, "dev": sorted(dev),
            "folds": folds, "seed": seed}  # fmt: skip
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _kept(done_dir: Path | None, name: str, key: str) -> dict[str, Any] | None:
    path = None if done_dir is None else done_dir / f"{name}.json"
    if path is None or not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a file cut short by a kill: run the recipe again
    return kept["cv"] if isinstance(kept, dict) and kept.get("key") == key else None


def _keep(done_dir: Path | None, name: str, key: str, cv: dict[str, Any]) -> None:
    if done_dir is None:
        return
    done_dir.mkdir(parents=True, exist_ok=True)
    tmp = done_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps({"key": key, "cv": cv}) + "\n")
    tmp.replace(done_dir / f"{name}.json")  # whole or not at all


def _interval(summary: dict[str, Any]) -> str:
    low, high = summary["interval"]
    return f"{low:.3f}–{high:.3f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table of recipes (CV on development pairs) and the chosen
    recipe's accuracy on the test pairs."""
    lines = [
        f"Recipe search on {report['data']}: {report['pairs']} pairs, "
        f"{len(report['test_pairs'])} held out for test (grouped by conversation), "
        f"grouped {report['folds']}-fold CV on the other {len(report['dev_pairs'])}.",
        "",
        "| recipe | CV accuracy | 95 % interval | per-fold | seconds a fold | fields |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["recipes"]:
        cv = row["cv"]
        mark = " **(chosen)**" if row["name"] == report["chosen"] else ""
        folds = ", ".join(f"{f['accuracy']:.3f}" for f in cv["per_fold"])
        fields = ", ".join(f"{k}={v}" for k, v in row["recipe"].items() if k != "base_model")
        seconds = [f["seconds"] for f in cv["per_fold"] if "seconds" in f]  # older kept CVs lack it
        cost = f"{sum(seconds) / len(seconds):.0f}" if seconds else "n/a"
        lines.append(f"| {row['name']}{mark} | {cv['accuracy']:.4f} | {_interval(cv)} | "
                     f"{folds} | {cost} | {fields or '(defaults)'} |")  # fmt: skip
    test = report["test"]
    lines += [
        "",
        f"Chosen: **{report['chosen']}**. Accuracy on the {test['pairs']} test pairs "
        f"({test['groups']} conversations) it was not chosen on: **{test['accuracy']:.4f}** "
        f"(95 % interval {_interval(test)}, {test['method']}).",
        "",
    ]
    return "\n".join(lines)


def write_search_report(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """recipes_report.json and recipes_report.md in `folder` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / REPORT_JSON, folder / REPORT_MD
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path
