"""Schemathesis against /openapi.json on the tiny test models: whatever it generates (valid
and invalid bodies, headers, methods' parameters), the server never answers 5xx (but the job
routes' documented 503 when jobs are off) and every answer matches the schema (documented
status, content type and body shape).

Bounded: FUZZ_EXAMPLES examples per operation (REWARDSERVE_FUZZ_EXAMPLES to change it;
`make fuzz` runs many more against the default models).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from rewardserve.jobs.enabled import DISABLED as JOBS_DISABLED
from servers import RewardServer

FUZZ_EXAMPLES = int(os.environ.get("REWARDSERVE_FUZZ_EXAMPLES", "25"))


def error_message(response) -> str | None:
    return response.json().get("error", {}).get("message")


def not_a_server_error_but_jobs_off(ctx, response, case) -> bool | None:
    """not_a_server_error, but for the one 5xx meant for the client: a job route on a server
    without a jobs manager answers the documented 503 saying jobs are disabled."""
    jobs_route = case.path.startswith("/v1/jobs")
    if jobs_route and response.status_code == 503 and error_message(response) == JOBS_DISABLED:
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [
    not_a_server_error_but_jobs_off,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


# Small limits keep each generated request cheap; the limits' own 4xx are fuzzed too.
LIMITS = ["--max-items-per-request", "8", "--max-text-chars", "4000", "--max-candidates", "8"]
# Jobs stay on (their routes are fuzzed on a real manager), but a generated body that is
# valid (a reward job on inline pairs is) starts a real training worker: one at a time, of
# one step, never restarted, stopped fast. The fixture cancels them all at teardown.
JOB_LIMITS = [
    "--max-running-jobs", "1",
    "--job-max-total-steps", "1",
    "--job-max-prompts", "4",
    "--job-max-sequences-per-step", "4",
    "--job-max-restarts", "0",
    "--job-stop-grace-s", "1",
]  # fmt: skip
WORKER_EXIT_S = 60.0


@pytest.fixture(scope="module")
def fuzz_server(model_repo, tmp_path_factory) -> Iterator[RewardServer]:
    # Its own copy of the repository: fuzzed admin calls may load and unload models.
    repo = tmp_path_factory.mktemp("fuzz") / "models"
    shutil.copytree(model_repo, repo)
    with RewardServer(repo, extra_args=[*LIMITS, *JOB_LIMITS]) as server:
        try:
            yield server
        finally:
            stop_every_job(server)


def stop_every_job(server: RewardServer) -> None:
    """Cancel the jobs the fuzzing left queued or running and wait for their workers to exit:
    workers outlive their service by design (a restarted one adopts them), so one left
    running here would outlive the test."""
    with server.http() as c:
        while jobs := c.get("/v1/jobs", params={"status": "queued,running"}).json()["data"]:
            for job in jobs:
                c.post(f"/v1/jobs/{job['id']}/cancel")  # a 409: it ended meanwhile
    assert server.proc is not None
    deadline = time.monotonic() + WORKER_EXIT_S
    while workers := job_workers(server.proc.pid):
        assert time.monotonic() < deadline, f"workers still running: {workers}"
        time.sleep(0.2)


def job_workers(pid: int) -> list[str]:
    """Command lines of the service's job workers still running."""
    found = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(child.cmdline())
            if "rewardserve.jobs.worker" in cmd and child.status() != psutil.STATUS_ZOMBIE:
                found.append(cmd)
    return found


def app_schema() -> dict:
    # The schema is built from the app at import (schemathesis parametrizes at collection);
    # test_served_schema_is_the_one_fuzzed checks the server serves this very schema.
    # (schemathesis.pytest.from_fixture, the lazy loader, breaks on pytest 9's Node.)
    from rewardserve.config import Settings
    from rewardserve.http.app import build_app

    return build_app(Settings(model_repository=ROOT / "models")).openapi()


ROOT = Path(__file__).resolve().parents[2]
APP_SCHEMA = app_schema()
schema = schemathesis.openapi.from_dict(APP_SCHEMA)


def test_served_schema_is_the_one_fuzzed(fuzz_server: RewardServer) -> None:
    with fuzz_server.http() as c:
        assert c.get("/openapi.json").json() == APP_SCHEMA


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples every run: a CI failure reproduces
    suppress_health_check=list(HealthCheck),
)
def test_openapi_no_5xx_and_schema_conformant(case, fuzz_server: RewardServer) -> None:
    case.call_and_validate(base_url=fuzz_server.base_url, checks=CHECKS, timeout=60)
    assert fuzz_server.proc is not None and fuzz_server.proc.poll() is None
