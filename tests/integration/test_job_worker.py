"""The jobs worker on a tiny PPO job whose rewards come from a real service over gRPC Score
(tests/servers.RewardServer). The REST side of the worker protocol is a fake
(tests/jobs_api: the job's GET and the reports, nothing else), so the worker's own contract
is checked apart from the manager's: in-process through run_job with a recording reporter,
then the real entrypoint as a process, SIGTERMed after its first checkpoint and resumed by a
second attempt. The worker under the real manager: test_jobs_api.py, test_job_faults.py."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio

from jobs_api import FakeJobsAPI, RecordingReporter
from ppo_models import PROMPTS, build_ppo_repository
from rewardserve.config import Settings
from rewardserve.engine.scoring import ScoringEngine
from rewardserve.jobs.specs import validate_submission
from rewardserve.jobs.worker import SIGTERM_EXIT, run_job
from rewardserve.schemas.jobs import JobCreate
from servers import RewardServer

SERVICE = Path(__file__).resolve().parents[2] / "service"
CONFIG = {"total_steps": 2, "batch_size": 2, "samples_per_prompt": 2, "mini_batch_size": 4,
          "max_new_tokens": 8, "rollout_backend": "transformers", "torch_threads": 1,
          "checkpoint_every": 1, "eval_max_prompts": 1}  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("job-worker")
    build_ppo_repository(root / "models")
    return root


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[RewardServer]:
    with RewardServer(root / "models", cache_dir=root / "cache") as srv:
        yield srv


@pytest.fixture(scope="module")
def settings(root: Path) -> Settings:
    return Settings(model_repository=root / "models", cache_dir=root / "cache",
                    data_dir=root / "data", models=["tiny-rm"], torch_threads=1)  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def runtime(settings: Settings) -> AsyncIterator[Any]:
    """What validate_submission asks of the service: its loaded reward models (the same
    repository the server serves)."""
    scoring = ScoringEngine(settings)
    await scoring.start()
    yield SimpleNamespace(scoring=scoring)
    await scoring.close()


def ppo_job(job_id: str, settings: Settings, runtime: Any, **config: Any) -> dict[str, Any]:
    req = JobCreate(type="ppo", config=CONFIG | config, prompts=PROMPTS)
    v = validate_submission(req, job_id, settings, runtime)
    return {"id": job_id, "type": "ppo", "config": v.config, "total_steps": v.total_steps,
            "attempt": 1, "status": "running"}  # fmt: skip


async def test_ppo_job_in_process(server: RewardServer, settings: Settings, runtime: Any) -> None:
    job = ppo_job("job-00000000000a", settings, runtime)
    rep = RecordingReporter()
    assert run_job(job, rep, server.grpc_target, None, resume=False) == 0
    assert rep.kinds() == ["started", "step", "checkpoint", "step", "checkpoint", "succeeded"]
    assert rep.reports[0].total_steps == 2
    steps = [r for r in rep.reports if r.kind == "step"]
    assert [r.step for r in steps] == [1, 2]
    for r in steps:
        assert r.metrics is not None and r.metrics["step"] == r.step
        # batch_size 2: one sample of each prompt, scored by the service's tiny-rm
        assert len(r.samples) == 2
        assert all(s.prompt and s.reward is not None and math.isfinite(s.reward) for s in r.samples)
    for r in rep.reports:
        if r.kind == "checkpoint":
            assert Path(r.checkpoint or "").name == f"step-{r.step}"
    result = rep.reports[-1].result or {}
    assert result["policy"] == "tiny-chat-ppo-job-00000000000a"
    assert result["reward_model"] == "tiny-rm" and result["steps"] == 2
    assert (settings.model_repository / result["policy"] / "model.yaml").is_file()
    assert json.loads(Path(result["result_path"]).read_text())["export_name"] == result["policy"]
    assert result["final_metrics"] == steps[-1].metrics
    assert result["eval"]["prompts"] == 1

    # an attempt after the run finished (its success unreported) reports it, trains nothing
    again = RecordingReporter(attempt=2)
    assert run_job(job, again, server.grpc_target, None, resume=True) == 0
    assert again.kinds() == ["started", "succeeded"]
    assert again.reports[-1].result == result


def worker(api: FakeJobsAPI, server: RewardServer, attempt: int, *flags: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARDSERVE_")}
    env.update(PYTHONPATH=str(SERVICE), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", REWARDSERVE_WORKER_API_KEY="worker-key")  # fmt: skip
    argv = [sys.executable, "-m", "rewardserve.jobs.worker", "--job-id", api.job["id"],
            "--attempt", str(attempt), "--rest", api.url, "--grpc", server.grpc_target,
            *flags]  # fmt: skip
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def test_worker_process_sigterm_then_resume(
    server: RewardServer, settings: Settings, runtime: Any
) -> None:
    job = ppo_job("job-00000000000b", settings, runtime, total_steps=3)
    checkpointed = threading.Event()
    with FakeJobsAPI(job) as api:
        api.on_report = lambda r: r["kind"] == "checkpoint" and checkpointed.set()
        proc = worker(api, server, 1)
        try:
            assert checkpointed.wait(120), proc.communicate(timeout=30)[0].decode()[-3000:]
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=30)[0].decode()
        finally:
            proc.kill()
        assert proc.returncode == SIGTERM_EXIT, out[-3000:]
        first = [r["kind"] for r in api.reports]
        assert first[:3] == ["started", "step", "checkpoint"] and "failed" not in first
        assert "succeeded" not in first
        assert {r["_auth"] for r in api.reports} == {"Bearer worker-key"}
        # the log has timestamps (it is the job's worker.log)
        assert out.splitlines()[0][:2] == "20", out[:500]

        api.reports.clear()
        api.job = job | {"attempt": 2}
        proc = worker(api, server, 2, "--resume")
        try:
            out = proc.communicate(timeout=300)[0].decode()
        finally:
            proc.kill()
        assert proc.returncode == 0, out[-3000:]
    kinds = [r["kind"] for r in api.reports]
    assert kinds[0] == "started" and kinds[-1] == "succeeded"
    steps = [r["step"] for r in api.reports if r["kind"] == "step"]
    assert steps and steps[-1] == 3 and steps[0] >= 2  # continued from its checkpoint
    assert {r["attempt"] for r in api.reports} == {2}
    assert api.reports[-1]["result"]["steps"] == 3
