"""PPO jobs through a real service started with `--job-runner ray --ray-address <head>`:
each attempt runs as a Ray job on the session's local head (tests/ray_head.py), the worker
reaching the service back over REST and gRPC. The runner alone is test_ray_runner.py."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("ray")

from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_actors

from ppo_models import PROMPTS, build_ppo_repository
from ray_head import RayHead, processes_naming
from rewardserve.jobs.runners.ray import submission_id
from servers import RewardServer

GRACE_S = 2.0
CONFIG = {
    "total_steps": 3,
    "batch_size": 2,
    "samples_per_prompt": 2,
    "mini_batch_size": 4,
    "max_new_tokens": 8,
    "rollout_backend": "transformers",
    "checkpoint_every": 1,
}
LONG_STEPS = 12
"""Jobs stopped midway: a step takes ~0.5 s here once the worker is up (~25 s), so 12 steps
leave several seconds after the first checkpoint to act in."""
JOB_TIMEOUT_S = 150.0


@pytest.fixture(scope="module")
def ray_server(
    ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RewardServer]:
    repo = build_ppo_repository(tmp_path_factory.mktemp("ray-jobs") / "models")
    args = [
        "--policy-backend", "transformers",
        "--job-runner", "ray", "--ray-address", ray_head.address,
        "--job-stop-grace-s", str(GRACE_S),
    ]  # fmt: skip
    with RewardServer(repo, extra_args=args) as server:
        yield server


@pytest.fixture
def http(ray_server: RewardServer) -> Iterator[httpx.Client]:
    with ray_server.http() as client:
        yield client


@pytest.fixture(scope="module")
def ray_client(ray_head: RayHead) -> JobSubmissionClient:
    return JobSubmissionClient(ray_head.address)


def _submit(http: httpx.Client, resources: dict[str, float] | None = None, **config: Any) -> str:
    body = {"type": "ppo", "config": CONFIG | config, "prompts": PROMPTS}
    if resources is not None:
        body["resources"] = resources
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _wait(
    http: httpx.Client, job_id: str, until: Any, what: str, timeout: float = JOB_TIMEOUT_S
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        assert time.monotonic() < deadline, f"{what}: not in {timeout:.0f} s: {job}"
        time.sleep(0.2)


def _ended(http: httpx.Client, job_id: str) -> dict[str, Any]:
    return _wait(http, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), "end")


def _events(http: httpx.Client, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every event of an ended job (the stream closes after its terminal status)."""
    events, kind = [], None
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line.split(":", 1)[1])["data"]))
    return events


def _worker_pids(job_id: str, attempt: int) -> list[int]:
    """The worker of that attempt, Ray's job driver (its entrypoint execs the worker)."""
    pids = []
    for pid in processes_naming(job_id):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "rewardserve.jobs.worker" in argv and argv[argv.index("--attempt") + 1] == str(attempt):
            pids.append(pid)
    return pids


def _alive(pid: int) -> bool:
    """Not a zombie: Ray's supervisor may reap its stopped driver a moment later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _ray_status(client: JobSubmissionClient, ref: str, want: JobStatus) -> JobStatus:
    """Ray's status of `ref` once it is `want`, or after a few seconds: Ray records a
    driver's end a little after the worker's final report reached the service."""
    deadline = time.monotonic() + 20
    while (status := client.get_job_status(ref)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return status


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


def _supervisor_resources(address: str, ref: str) -> dict[str, float]:
    """What Ray reserved for the job's entrypoint (its supervisor actor holds it)."""
    actors = list_actors(
        address=address, filters=[("name", "=", f"_ray_internal_job_actor_{ref}")], detail=True
    )
    assert actors, f"Ray has no supervisor actor for {ref}"
    return dict(actors[0].required_resources)


def _long_job_at_its_first_checkpoint(http: httpx.Client) -> tuple[str, int]:
    """A LONG_STEPS job, once it has a checkpoint; and its worker's pid."""
    job_id = _submit(http, total_steps=LONG_STEPS)
    _wait(http, job_id, lambda j: j["checkpoints"], "a first checkpoint")
    (pid,) = _worker_pids(job_id, 1)
    return job_id, pid


def test_ppo_job_runs_as_a_ray_job_and_its_policy_answers(
    http: httpx.Client, ray_client: JobSubmissionClient, ray_head: RayHead
) -> None:
    started = time.monotonic()
    job_id = _submit(http, resources={"cpus": 1, "memory_gib": 0.5})
    ref = submission_id(job_id, 1)
    assert ref == f"rewardserve-{job_id}-a1"
    _wait(http, job_id, lambda _: bool(_worker_pids(job_id, 1)), "the worker starts", 60)

    info = ray_client.get_job_info(ref)
    assert info.metadata == {"rewardserve_job": job_id, "attempt": "1"}
    assert info.status in (JobStatus.PENDING, JobStatus.RUNNING)
    assert _supervisor_resources(ray_head.address, ref) == {"CPU": 1.0, "memory": 0.5 * 2**30}
    # What the service sets for a worker reaches it through Ray's runtime_env.
    (pid,) = _worker_pids(job_id, 1)
    env = _environ(pid)
    assert env["OMP_NUM_THREADS"] == "1"
    service_dir = str(Path(__file__).resolve().parents[2] / "service")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == service_dir
    assert env.get("CUDA_VISIBLE_DEVICES") == "", "no GPUs asked: none seen (as locally)"

    job = _ended(http, job_id)
    took = time.monotonic() - started
    assert job["status"] == "succeeded", job
    assert (job["step"], job["attempt"], job["restarts"]) == (3, 1, 0)
    assert _ray_status(ray_client, ref, JobStatus.SUCCEEDED) == JobStatus.SUCCEEDED
    events = _events(http, job_id)
    assert [d["step"] for kind, d in events if kind == "step"] == [1, 2, 3]
    assert [d["status"] for kind, d in events if kind == "status"][-1] == "succeeded"
    metrics = http.get(f"/v1/jobs/{job_id}/metrics").json()
    assert [m["step"] for m in metrics["data"]] == [1, 2, 3]

    logs = http.get(f"/v1/jobs/{job_id}/logs")
    assert logs.status_code == 200
    assert f"=== ray job {ref} ===" in logs.text
    policy = job["result"]["policy"]
    bon = http.post(
        "/v1/best-of-n", json={"policy": policy, "prompt": "Hi", "n": 2, "max_tokens": 4}
    )
    assert bon.status_code == 200, bon.text
    print(f"\nray ppo job: {took:.1f} s to succeed")


def test_cancel_stops_the_ray_job_and_resume_finishes_from_the_checkpoint(
    http: httpx.Client, ray_client: JobSubmissionClient
) -> None:
    job_id, pid = _long_job_at_its_first_checkpoint(http)

    started = time.monotonic()
    r = http.post(f"/v1/jobs/{job_id}/cancel")
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "cancelled"
    assert job["step"] < LONG_STEPS, "finished before the cancel: make LONG_STEPS larger"
    # Stopped: the worker took SIGTERM and went (Ray's SIGKILL comes only after the grace).
    assert took < GRACE_S + 5, took
    assert ray_client.get_job_status(submission_id(job_id, 1)) == JobStatus.STOPPED
    assert not _alive(pid)
    kept = http.get(f"/v1/jobs/{job_id}").json()["checkpoints"]
    assert kept and all(Path(c["path"]).exists() for c in kept), kept
    newest = max(c["step"] for c in kept)

    r = http.post(f"/v1/jobs/{job_id}/resume")
    assert r.status_code == 200, r.text
    job = _ended(http, job_id)
    assert job["status"] == "succeeded", job
    assert (job["step"], job["attempt"]) == (LONG_STEPS, 2)
    second = submission_id(job_id, 2)
    assert _ray_status(ray_client, second, JobStatus.SUCCEEDED) == JobStatus.SUCCEEDED
    events = _events(http, job_id)
    resumed = next(
        i for i, (kind, d) in enumerate(events) if kind == "status" and d.get("reason") == "resumed"
    )
    after = [d["step"] for kind, d in events[resumed:] if kind == "step"]
    assert after == list(range(newest + 1, LONG_STEPS + 1)), (newest, after)


@pytest.mark.parametrize(
    ("resources", "field"), [({"cpus": 3}, "resources.cpus"), ({"gpus": 1}, "resources.gpus")]
)
def test_more_than_the_ray_node_has_is_refused_at_submission(
    http: httpx.Client, resources: dict[str, float], field: str
) -> None:
    before = http.get("/v1/jobs").json()["data"]
    r = http.post("/v1/jobs", json={"type": "ppo", "config": CONFIG, "prompts": PROMPTS,
                                    "resources": resources})  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["field"] == field
    assert "Ray cluster" in error["message"]
    assert http.get("/v1/jobs").json()["data"] == before, "nothing stored"


def test_a_killed_worker_is_restarted_as_attempt_2_and_succeeds(
    http: httpx.Client, ray_client: JobSubmissionClient
) -> None:
    job_id, pid = _long_job_at_its_first_checkpoint(http)
    os.kill(pid, signal.SIGKILL)

    job = _ended(http, job_id)
    assert job["status"] == "succeeded", job
    assert (job["step"], job["attempt"], job["restarts"]) == (LONG_STEPS, 2, 1)
    first = ray_client.get_job_info(submission_id(job_id, 1))
    assert first.status == JobStatus.FAILED, first
    second = submission_id(job_id, 2)
    assert _ray_status(ray_client, second, JobStatus.SUCCEEDED) == JobStatus.SUCCEEDED
    messages = [d["message"] for kind, d in _events(http, job_id) if kind == "log"]
    died = [m for m in messages if m.startswith("worker died")]
    assert len(died) == 1 and "SIGKILL" in died[0] and "restart 1 of" in died[0], messages
