"""The worker's core (jobs.worker.run_job) on reward jobs: the job validated by jobs.specs,
trained for real on a tiny model, registered in the repository and loadable by the scoring
engine. The reporter is tests/jobs_api.RecordingReporter, a fake of the service's REST API
only (the transports and the manager are tested with the real worker elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from builders import build_tiny_rm
from jobs_api import RecordingReporter
from rewardserve.config import Settings
from rewardserve.engine.scoring import ScoringEngine
from rewardserve.jobs.reporter import Superseded
from rewardserve.jobs.specs import validate_submission
from rewardserve.jobs.worker import JOB_MARKER, run_job
from rewardserve.schemas.jobs import JobCreate
from rewardserve.schemas.scoring import ScoreRequest

JOB_ID = "job-00000000beef"


def pairs(n: int) -> list[dict[str, str]]:
    return [
        {"chosen": f"\n\nHuman: question {i}?\n\nAssistant: a kind and helpful answer {i}",
         "rejected": f"\n\nHuman: question {i}?\n\nAssistant: go away {i}"}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    build_tiny_rm(tmp_path / "models", "tiny-rm", default=True)
    return Settings(
        model_repository=tmp_path / "models",
        cache_dir=tmp_path / "cache",
        data_dir=tmp_path / "data",
        torch_threads=1,
    )


def reward_job(settings: Settings, **config: Any) -> dict[str, Any]:
    """The job as GET /v1/jobs/{id} gives it to the worker."""
    cfg = {"base_model": "tiny-rm", "pairs": pairs(14), "batch_size": 4, "epochs": 2,
           "eval_fraction": 0.2, "max_length": 32, "eval_batch_size": 8} | config  # fmt: skip
    req = JobCreate(type="reward", config=cfg)
    runtime = SimpleNamespace()  # reward jobs ask nothing of the runtime
    v = validate_submission(req, JOB_ID, settings, runtime)
    return {"id": JOB_ID, "type": "reward", "config": v.config, "total_steps": v.total_steps,
            "attempt": 1, "status": "running"}  # fmt: skip


async def test_reward_job_trains_registers_and_reports(settings: Settings) -> None:
    job = reward_job(settings, name="my-rm")
    rep = RecordingReporter()
    assert run_job(job, rep, "unused:1", None, resume=False) == 0
    kinds = rep.kinds()
    assert kinds[0] == "started" and kinds[-1] == "succeeded"
    assert rep.reports[0].total_steps == job["total_steps"] == 6  # 11 pairs / 4, 2 epochs
    steps = [r for r in rep.reports if r.kind == "step"]
    assert [r.step for r in steps] == list(range(1, job["total_steps"] + 1))
    assert {"loss", "running_accuracy", "lr", "epoch"} <= set(steps[0].metrics or {})
    result = rep.reports[-1].result or {}
    assert result["model"] == "my-rm" and result["steps"] == 6
    assert 0.0 <= result["eval_accuracy"] <= 1.0

    folder = settings.model_repository / "my-rm"
    marker = json.loads((folder / JOB_MARKER).read_text())
    assert marker["job_id"] == JOB_ID
    assert not list(settings.model_repository.glob(".*"))  # no temporary folder left
    eng = ScoringEngine(settings.model_copy(update={"models": ["my-rm"]}))
    await eng.start()
    try:
        info = next(m for m in eng.list_models() if m.id == "my-rm")
        assert info.kind == "reward" and info.status == "loaded" and info.max_length == 32
        items = [{"text": p["chosen"]} for p in pairs(2)]
        scored = await eng.score(ScoreRequest.model_validate({"model": "my-rm", "items": items}))
        assert len(scored.results) == 2
    finally:
        await eng.close()

    # a restarted attempt finds its export complete: it reports it, it does not train again
    again = RecordingReporter(attempt=2)
    assert run_job(job, again, "unused:1", None, resume=True) == 0
    assert again.kinds() == ["started", "succeeded"]
    assert again.reports[-1].result == result


def test_name_taken_since_submission_fails_before_training(settings: Settings) -> None:
    job = reward_job(settings, name="late")
    build_tiny_rm(settings.model_repository, "late", seed=5)
    rep = RecordingReporter()
    assert run_job(job, rep, "unused:1", None, resume=False) == 1
    assert rep.kinds() == ["started", "failed"]
    assert (rep.reports[-1].error or "").startswith("FileExistsError: ")


def test_superseded_exits_0_without_reporting_a_failure(settings: Settings) -> None:
    job = reward_job(settings)
    rep = RecordingReporter(refuse=lambda kind: Superseded("409") if kind == "step" else None)
    assert run_job(job, rep, "unused:1", None, resume=False) == 0
    assert rep.kinds() == ["started"]
    assert not (settings.model_repository / f"rm-{JOB_ID}").exists()
