"""`rewardserve ppo`: the command on tiny models: bad configs, SIGKILL and --resume, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ppo_models import PROMPTS, build_ppo_repository

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "300"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ppo_repository(tmp_path_factory.mktemp("repo"))


def write_config(path: Path, repo: Path, **fields: object) -> Path:
    base = {"model_repository": str(repo), "prompts": PROMPTS, "total_steps": 20,
            "batch_size": 8, "samples_per_prompt": 4, "mini_batch_size": 16,
            "max_new_tokens": 16, "torch_threads": 1, "learning_rate": 1e-2,
            "checkpoint_every": 5, "keep_checkpoints": 2, "normalize_rewards": True,
            "kl_controller": "adaptive", "horizon": 200}  # fmt: skip
    path.write_text(yaml.safe_dump(base | fields))
    return path


def ppo_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "rewardserve.cli", "ppo", str(config), *args]


def ppo(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ppo_cmd(config, *args), capture_output=True, text=True, env=ENV, timeout=600
    )


BAD = [
    ({"total_steps": -1}, "total_steps"),
    ({"advantage_estimator": "reinforce"}, "advantage_estimator"),
    ({"policy": "no-such-policy"}, "policy"),
    ({"prompts": []}, "prompts"),
    ({"batch_size": 3, "samples_per_prompt": 2, "mini_batch_size": 4}, "mini_batch_size"),
    ({"prompts": None, "prompts_file": "/nonexistent.jsonl"}, "prompts_file"),
    ({"advantage_estimator": "rloo", "samples_per_prompt": 1}, "samples_per_prompt"),
]


@pytest.mark.parametrize(("bad", "field"), BAD, ids=[f for _, f in BAD])
def test_bad_config_exits_2_naming_the_field(
    repo: Path, tmp_path: Path, bad: dict[str, object], field: str
) -> None:
    done = ppo(write_config(tmp_path / "c.yaml", repo, **bad))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"field '{field}'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_bad_override_exits_2(repo: Path, tmp_path: Path) -> None:
    done = ppo(write_config(tmp_path / "c.yaml", repo), "--set", "kl_estimator=k9")
    assert done.returncode == 2 and "field 'kl_estimator'" in done.stderr


def _comparable(metrics: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def test_sigkill_then_resume_matches_an_uninterrupted_run(repo: Path, tmp_path: Path) -> None:
    """Same seeded config, CPU, the same thread count (1), deterministic ops, every random
    draw seeded per step and every RNG and optimiser state restored from the checkpoint: the
    resumed run's metrics equal the uninterrupted run's. Compared to 1e-6 (relative), which
    leaves only float-formatting room: on one machine they agree to the last bit."""
    whole = ppo(
        write_config(tmp_path / "whole.yaml", repo, export_name="whole"),
        "--output", str(tmp_path / "whole"),
    )  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "exported policy: whole" in whole.stdout

    out = tmp_path / "killed"
    config = write_config(tmp_path / "killed.yaml", repo, export_name="resumed")
    proc = subprocess.Popen(
        ppo_cmd(config, "--output", str(out)),
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-5").is_dir():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    steps_done = len((out / "metrics.jsonl").read_text().splitlines())
    assert 5 <= steps_done < 20 and not (out / "result.json").exists()

    resumed = ppo(config, "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "exported policy: resumed" in resumed.stdout

    a = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == list(range(1, 21))  # re-run steps replaced, not doubled
    for x, y in zip(a, b, strict=True):
        assert _comparable(y) == pytest.approx(_comparable(x), rel=1e-6, abs=1e-9)
    ra = json.loads((tmp_path / "whole" / "result.json").read_text())
    rb = json.loads((out / "result.json").read_text())
    assert rb["eval"]["trained"]["reward"] == pytest.approx(ra["eval"]["trained"]["reward"])
    assert rb["eval"]["kl_to_reference"] == pytest.approx(ra["eval"]["kl_to_reference"])
    assert (repo / "resumed" / "model.yaml").is_file()
