"""benchmarks/overoptimization.py's pieces: the three-way split is disjoint by conversation,
and gold reward at equal KL is read off hand-made trajectories where the answer is known."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import overoptimization as oo  # noqa: E402

from rewardserve.training.reward.data import PreferencePair, group_key  # noqa: E402


def conversation_pairs(conversations: int, forks: int = 2) -> list[PreferencePair]:
    """`forks` pairs per conversation, each fork a different second turn after the same
    opening question (the way HH-RLHF forks), so a split by pair would separate siblings."""
    pairs = []
    for c in range(conversations):
        opening = f"\n\nHuman: question number {c} about topic {c % 7}?"
        for f in range(forks):
            prompt = f"{opening}\n\nAssistant: first answer\n\nHuman: follow-up {f}"
            pairs.append(
                PreferencePair(
                    chosen=f"{prompt}\n\nAssistant: a good reply {f}",
                    rejected=f"{prompt}\n\nAssistant: a bad reply {f}",
                )
            )
    return pairs


def test_splits_are_disjoint_by_conversation_and_seeded() -> None:
    pairs = conversation_pairs(200)
    s = oo.split_data(pairs, seed=3, eval_prompts=5)
    keys = {
        "proxy": {group_key(p) for p in s.proxy_pairs},
        "gold": {group_key(p) for p in s.gold_pairs},
    }
    prompt_key = {
        side: {rows[0]["content"] for rows in prompts}
        for side, prompts in (("train", s.train_prompts), ("eval", s.eval_prompts))
    }
    assert not keys["proxy"] & keys["gold"]
    # every prompt's opening question is a conversation neither reward model trained on
    openings = {k.split("?")[0] for k in keys["proxy"] | keys["gold"]}
    for side in ("train", "eval"):
        assert not {t.casefold().split("?")[0] for t in prompt_key[side]} & openings
    assert not prompt_key["train"] & prompt_key["eval"]
    assert len(s.eval_prompts) == 5
    # ~50/40/10 of the conversations; forks of a conversation stay together
    assert len(s.proxy_pairs) == pytest.approx(200, abs=4)
    assert len(s.gold_pairs) == pytest.approx(160, abs=4)
    assert len(s.train_prompts) + len(s.eval_prompts) == pytest.approx(20, abs=2)
    # the prompt is the conversation up to its last "Assistant:", as chat messages
    assert [m["role"] for m in s.eval_prompts[0]] == ["user", "assistant", "user"]
    again = oo.split_data(pairs, seed=3, eval_prompts=5)
    assert again.eval_prompts == s.eval_prompts and again.proxy_pairs == s.proxy_pairs
    other = oo.split_data(pairs, seed=4, eval_prompts=5)
    assert other.proxy_pairs != s.proxy_pairs


def test_split_refuses_too_few_prompt_conversations() -> None:
    with pytest.raises(ValueError, match="eval prompts"):
        oo.split_data(conversation_pairs(30), seed=0, eval_prompts=10)
    with pytest.raises(ValueError, match="fractions"):
        oo.split_data(conversation_pairs(30), seed=0, proxy_fraction=0.6, gold_fraction=0.4)


def test_value_at_kl_interpolates_the_first_crossing() -> None:
    curve = [(0.0, 0.0), (2.0, 1.0), (4.0, 0.5), (3.0, 2.0), (8.0, -1.0)]
    assert oo.value_at_kl(curve, 1.0) == pytest.approx(0.5)
    assert oo.value_at_kl(curve, 2.0) == pytest.approx(1.0)
    # KL 3.5 is first crossed going 2 -> 4 (not on the later 4 -> 3 step back)
    assert oo.value_at_kl(curve, 3.5) == pytest.approx(0.625)
    assert oo.value_at_kl(curve, 6.0) == pytest.approx(2.0 - 3.0 * 3.0 / 5.0)  # on 3 -> 8
    assert oo.value_at_kl(curve, 9.0) is None


def test_equal_kl_table_compares_gold_where_every_run_got() -> None:
    def run(name: str, points: list[tuple[float, float]]) -> list[dict[str, object]]:
        return [
            {"controller": name, "step": 4 * i, "kl": k, "kl_stderr": 0.1, "proxy": 2 * g,
             "proxy_stderr": 0.1, "gold": g, "gold_stderr": 0.1, "kl_coef": 0.02}
            for i, (k, g) in enumerate(points)
        ]  # fmt: skip

    runs = {
        "fixed": run("fixed", [(0.0, 0.0), (5.0, 1.0), (10.0, 0.0)]),  # hacks after KL 5
        "uncertainty": run("uncertainty", [(0.0, 0.0), (2.0, 0.8), (4.0, 1.2)]),
    }
    table = oo.equal_kl_table(runs, points=4)
    assert table["kl"] == pytest.approx([1.0, 2.0, 3.0, 4.0])  # up to uncertainty's max, 4
    assert table["gold"]["fixed"] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert table["gold"]["uncertainty"] == pytest.approx([0.4, 0.8, 1.0, 1.2])
    assert table["proxy"]["fixed"][0] == pytest.approx(0.4)
    assert table["final"]["fixed"]["gold"] == 0.0
    md = oo.markdown_table(table, {"fixed": 12.0, "uncertainty": 13.0}, "Test CPU")
    assert "| 4.00 | +0.800 | +1.200 |" in md
    assert "| gold reward | +0.000 ± 0.100 | +1.200 ± 0.100 |" in md
    assert "Test CPU" in md


def test_no_common_kl_when_a_run_never_moved() -> None:
    assert oo.common_kl_grid({"a": [(0.0, 0.0), (3.0, 1.0)], "b": [(0.0, 0.0)]}) == []


def test_reused_runs_are_cut_where_the_others_stopped(tmp_path: Path) -> None:
    import json

    path = tmp_path / "fixed.jsonl"
    path.write_text("".join(json.dumps({"step": s, "kl": s / 2}) + "\n" for s in (0, 4, 8, 12)))
    assert [r["step"] for r in oo.kept_records(path, 8)] == [0, 4, 8]
    assert [r["step"] for r in oo.kept_records(path, None)] == [0, 4, 8, 12]
    with pytest.raises(SystemExit, match="does not exist"):
        oo.kept_records(tmp_path / "adaptive.jsonl", 8)
