"""benchmarks/bench_ppo.py on tiny models, one step short of nothing: every trainer it
compares (TRL's GRPO, RLOO and PPO, ours) runs 2 steps in this process and reports a step
time split into phases, and the table puts ours beside TRL's. Timings are not asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("trl")
import bench_ppo  # noqa: E402
from bench_bon import DATA  # noqa: E402

from ppo_models import build_ppo_repository  # noqa: E402

pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"no HH prompts at {DATA}")


@pytest.fixture(scope="module")
def shape(tmp_path_factory: pytest.TempPathFactory) -> bench_ppo.Shape:
    torch.set_num_threads(1)
    repo = build_ppo_repository(tmp_path_factory.mktemp("models"))
    return bench_ppo.Shape(
        steps=2,
        batch=1,
        samples=2,
        max_new_tokens=4,
        threads=1,
        policy="tiny-chat",
        reward_model="tiny-rm",
        models=str(repo),
        cache=str(tmp_path_factory.mktemp("cache")),
    )


ROWS = [
    bench_ppo.Row("trl", "grpo"),
    bench_ppo.Row("trl", "rloo"),
    bench_ppo.Row("trl", "gae"),
    bench_ppo.Row("ours", "grpo"),
    bench_ppo.Row("ours", "gae"),
]


@pytest.fixture(scope="module")
def results(shape: bench_ppo.Shape) -> list[bench_ppo.Result]:
    return [bench_ppo.run_in_process(shape, row) for row in ROWS]


@pytest.mark.parametrize("i", range(len(ROWS)), ids=[r.label for r in ROWS])
def test_every_trainer_reports_each_step_split_into_phases(
    results: list[bench_ppo.Result], i: int
) -> None:
    r = results[i]
    assert r.error is None, r.error
    assert len(r.steps) == 2
    for step in r.steps:
        assert step["step_s"] > 0
        assert all(step[p] >= 0 for p in ("rollout_s", "reward_s", "update_s"))
        assert step["rollout_s"] > 0 and step["reward_s"] > 0 and step["update_s"] > 0
        phases = sum(step.get(p, 0.0) for p in bench_ppo.PHASES)
        assert phases <= step["step_s"] * 1.05 + 0.05  # the phases lie inside the step


def test_the_table_puts_ours_beside_trl_with_the_ratio(
    shape: bench_ppo.Shape, results: list[bench_ppo.Result]
) -> None:
    lines = bench_ppo.table(shape, results)
    rows = [line for line in lines if line.startswith("| ")][1:]
    assert len(rows) == len(ROWS)
    ours_grpo = next(line for line in rows if "ours grpo" in line)
    assert ours_grpo.rstrip(" |").endswith("x")  # ours / TRL for the same estimator
    assert bench_ppo.medians(results[0]) is not None
