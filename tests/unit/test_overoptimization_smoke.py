"""benchmarks/overoptimization.py end to end on tiny models: the splits, a proxy ensemble
and a gold reward model trained from tiny backbones, two controllers' PPO runs of 2 steps
(transformers rollouts), judged at every step, and the table, plot and summary. Then a
rerun reuses the trained reward models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import overoptimization as oo  # noqa: E402

from builders import build_tiny_rm  # noqa: E402
from ppo_models import build_tiny_chat_policy  # noqa: E402

pytestmark = pytest.mark.skipif(not oo.DATA.exists(), reason=f"no HH pairs at {oo.DATA}")


def test_two_controllers_judged_by_a_gold_model_they_never_trained_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    policies = tmp_path / "policies"
    build_tiny_chat_policy(policies)
    bases = tmp_path / "bases"
    proxy_base = build_tiny_rm(bases, "proxy-base", seed=1) / "weights"
    gold_base = build_tiny_rm(bases, "gold-base", seed=2) / "weights"
    out = tmp_path / "overopt"
    argv = [
        "--output", str(out), "--controllers", "fixed", "uncertainty",
        "--ensemble", "2", "--proxy-base", str(proxy_base), "--gold-base", str(gold_base),
        "--rm-max-pairs", "24", "--rm-set", "max_length=64",
        "--policy-repository", str(policies), "--policy", "tiny-chat",
        "--cache-dir", str(tmp_path / "cache"), "--steps", "2", "--batch", "2",
        "--samples", "2", "--max-new-tokens", "6", "--judge-every", "1",
        "--eval-prompts", "3", "--rollout-backend", "transformers", "--torch-threads", "1",
        "--set", "mini_batch_size=4",
    ]  # fmt: skip
    summary = oo.main(argv)

    split = json.loads((out / "splits" / "split.json").read_text())
    assert split["disjoint"] and split["prompts"]["eval"] == 3
    runs = {
        c: [json.loads(x) for x in (out / f"{c}.jsonl").read_text().splitlines()]
        for c in ("fixed", "uncertainty")
    }
    for records in runs.values():
        assert [r["step"] for r in records] == [0, 1, 2]
        # at step 0 the policy is its reference: every sample's log-ratio is exactly 0
        assert records[0]["kl"] == 0.0
        assert all(r["uncertainty"] is not None and r["uncertainty"] >= 0 for r in records)
        assert all(isinstance(r["gold"], float) and r["gold_stderr"] >= 0 for r in records)
    # same seed, same initial policy, same judge: step 0 is the same checkpoint in both runs
    first = [{k: r[0][k] for k in ("kl", "proxy", "gold", "sample")} for r in runs.values()]
    assert first[0] == first[1]
    # proxy and gold are different models scoring the same samples
    assert runs["fixed"][0]["proxy"] != runs["fixed"][0]["gold"]
    assert set(summary["final"]) == {"fixed", "uncertainty"}
    assert (out / "overopt.png").stat().st_size > 10_000
    md = (out / "equal_kl.md").read_text()
    assert "| gold reward |" in md and "gold, uncertainty" in md
    assert "![proxy and gold reward" in (out / "summary.md").read_text()
    assert (out / "runs" / "fixed" / "metrics.jsonl").is_file()

    capsys.readouterr()
    oo.main([*argv[:2], "--controllers", "fixed", *argv[5:]])
    printed = capsys.readouterr().out
    assert "overopt-proxy: reusing" in printed and "overopt-gold: reusing" in printed
