"""Crashes lose nothing: PPO jobs on a real service survive kill -9 of their worker, of the
service, of both, and a service restart with jobs still queued; each ends with the very
numbers of an uninterrupted run of the same config and seed.

Everything here is real: `rewardserve serve` subprocesses (tests/servers.RewardServer) on a
data dir that outlives them, the local runner's worker processes, the trainer's checkpoints.
A worker is found through the job's runner ref in the service's SQLite store
('pid:<pid>:<start time>', read read-only) and is signalled only after its start time and its
command line (job id, attempt) confirm it is that job's worker; whatever worker a test leaves
behind is killed the same way in teardown, as a SIGTERM'd or SIGKILL'd service leaves its
workers running on purpose.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from ppo_models import PROMPTS, build_ppo_repository
from rewardserve.jobs.runners.local import parse_ref, process_start_time
from servers import RewardServer

# Tiny and seeded. 8 steps with a checkpoint every 2: a kill after the first checkpoint
# still lands well before the end (a step takes ~0.1 s, and more on a busy machine).
STEPS = 8
CONFIG: dict[str, Any] = {
    "total_steps": STEPS,
    "batch_size": 2,
    "samples_per_prompt": 2,
    "mini_batch_size": 4,
    "max_new_tokens": 8,
    "rollout_backend": "transformers",
    "checkpoint_every": 2,
    "eval_max_prompts": 1,
    "seed": 5,
    "torch_threads": 1,
}
JOB_TIMEOUT_S = 120.0
SERVER_ARGS = ["--policy-backend", "transformers", "--job-stop-grace-s", "5"]


# ---- processes --------------------------------------------------------------------------------


def alive(pid: int, start: int) -> bool:
    """The process with this pid and start time still runs (a zombie counts as gone)."""
    if process_start_time(pid) != start:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def is_worker(pid: int, start: int, job_id: str, attempt: int | None = None) -> bool:
    """`pid` is (still) the worker of `job_id` (of that attempt, when given)."""
    if not alive(pid, start):
        return False
    try:
        cmd = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    if "rewardserve.jobs.worker" not in cmd or job_id not in cmd:
        return False
    return attempt is None or cmd[cmd.index("--attempt") + 1] == str(attempt)


def wait_gone(pid: int, start: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid, start):
        assert time.monotonic() < deadline, f"process {pid} still runs after {timeout:.0f} s"
        time.sleep(0.05)


def job_rows(data_dir: Path) -> list[dict[str, Any]]:
    """The jobs table as the store left it (read-only: the service may be writing)."""
    path = data_dir / "jobs.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        return [
            dict(r)
            for r in db.execute("SELECT id, status, attempt, runner_ref FROM jobs ORDER BY seq")
        ]
    finally:
        db.close()


@dataclass
class Worker:
    job_id: str
    attempt: int
    pid: int
    start: int

    def alive(self) -> bool:
        return is_worker(self.pid, self.start, self.job_id, self.attempt)

    def kill(self) -> None:
        """kill -9, after checking it is still this job's worker; returns once it is gone."""
        assert self.alive(), f"worker {self} is not running"
        os.kill(self.pid, signal.SIGKILL)
        wait_gone(self.pid, self.start)


def reap_workers(data_dir: Path) -> None:
    """Kill every worker a data dir's store names that still runs (a test that failed midway
    leaves them: a stopped or killed service does not stop its workers)."""
    for row in job_rows(data_dir):
        if row["runner_ref"]:
            pid, start = parse_ref(row["runner_ref"])
            if is_worker(pid, start, row["id"]):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


# ---- services on a data dir that outlives them ------------------------------------------------


@dataclass
class Site:
    """A model repository and a data dir; services come and go on them."""

    repository: Path
    cache_dir: Path
    data_dir: Path
    servers: list[RewardServer] = field(default_factory=list)

    def serve(self, *extra: str) -> RewardServer:
        # The later --data-dir wins over the one RewardServer gives every server.
        args = [*SERVER_ARGS, "--data-dir", str(self.data_dir), *extra]
        server = RewardServer(self.repository, cache_dir=self.cache_dir, extra_args=args)
        self.servers.append(server)
        return server.wait_ready()

    def close(self) -> None:
        for server in self.servers:
            server.cleanup()
        reap_workers(self.data_dir)

    def worker(self, job_id: str, attempt: int, timeout: float = 60.0) -> Worker:
        """The worker of that attempt, once its ref is stored and its process runs."""
        deadline = time.monotonic() + timeout
        while True:
            row = next((r for r in job_rows(self.data_dir) if r["id"] == job_id), None)
            if row and row["attempt"] == attempt and row["runner_ref"]:
                pid, start = parse_ref(row["runner_ref"])
                if is_worker(pid, start, job_id, attempt):
                    return Worker(job_id, attempt, pid, start)
            assert time.monotonic() < deadline, (
                f"no running worker for attempt {attempt} of {job_id}: {row}\n{self.log_tails()}"
            )
            time.sleep(0.05)

    def log_tails(self) -> str:
        tails = [f"--- server {i} ---\n{s.log_tail(3000)}" for i, s in enumerate(self.servers)]
        for log in sorted(self.data_dir.glob("jobs/*/worker.log")):
            tails.append(f"--- {log.parent.name}/worker.log ---\n{log.read_text()[-3000:]}")
        return "\n".join(tails)

    def kill_service(self, server: RewardServer) -> None:
        """kill -9 the service process (its workers, in their own process groups, live on)."""
        assert server.proc is not None and server.proc.poll() is None
        server.proc.kill()
        server.proc.wait(30)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ppo_repository(tmp_path_factory.mktemp("ppo-repo"))


@pytest.fixture
def make_site(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], Site]]:
    sites: list[Site] = []

    def make() -> Site:
        root = tmp_path_factory.mktemp("site")
        site = Site(repository, root / "cache", root / "data")
        sites.append(site)
        return site

    yield make
    for site in sites:
        site.close()


@dataclass
class Live:
    """The module's long-lived service (--job-max-restarts 1) and its reference run."""

    site: Site
    server: RewardServer
    job: dict[str, Any]
    metrics: list[dict[str, Any]]


@pytest.fixture(scope="module")
def live(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("live")
    site = Site(repository, root / "cache", root / "data")
    try:
        server = site.serve("--job-max-restarts", "1")
        with server.http() as client:
            job_id = submit(client)
            job = wait_terminal(client, site, job_id)
            assert job["status"] == "succeeded", site.log_tails()
            assert job["attempt"] == 1 and job["restarts"] == 0
            metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
        assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
        yield Live(site, server, job, metrics)
    finally:
        site.close()


# ---- the REST side ----------------------------------------------------------------------------


def submit(client: httpx.Client) -> str:
    r = client.post("/v1/jobs", json={"type": "ppo", "config": CONFIG, "prompts": PROMPTS})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def wait_terminal(
    client: httpx.Client, site: Site, job_id: str, timeout: float = JOB_TIMEOUT_S
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        assert time.monotonic() < deadline, f"{job_id} still {job['status']}\n{site.log_tails()}"
        time.sleep(0.2)


def wait_event(
    client: httpx.Client,
    site: Site,
    job_id: str,
    pred: Callable[[dict[str, Any]], bool],
    timeout: float = JOB_TIMEOUT_S,
) -> dict[str, Any]:
    """The first of the job's events (SSE, from the start) that `pred` accepts; the stream
    makes the test react within milliseconds, which a kill between two steps needs."""
    deadline = time.monotonic() + timeout
    timeouts = httpx.Timeout(10.0, read=timeout)
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeouts) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if pred(event):
                    return dict(event)
            assert time.monotonic() < deadline, f"no such event\n{site.log_tails()}"
    raise AssertionError(f"the event stream of {job_id} ended first\n{site.log_tails()}")


def first_checkpoint(client: httpx.Client, site: Site, job_id: str) -> dict[str, Any]:
    return wait_event(client, site, job_id, lambda e: e["type"] == "checkpoint")


def crash_after_a_checkpoint(site: Site, *extra: str, jobs: int = 1) -> tuple[list[str], Worker]:
    """A service on the site gets `jobs` jobs; once the first has checkpointed, the service is
    killed -9. The job ids and the first job's worker (alive: its own process group)."""
    server = site.serve(*extra)
    with server.http() as client:
        ids = [submit(client) for _ in range(jobs)]
        worker = site.worker(ids[0], attempt=1)
        first_checkpoint(client, site, ids[0])
    site.kill_service(server)
    return ids, worker


def events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """All events of a terminal job (its stream ends after the terminal status)."""
    out = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                out.append(json.loads(line[5:]))
    return out


def trainer_numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    """A step's metrics without its wall-clock timings."""
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def assert_same_run(client: httpx.Client, site: Site, job: dict[str, Any], reference: Live) -> None:
    """The job succeeded with one metrics row per step, each the reference's numbers.

    Exact equality: a resumed run restores the model, optimizer, scheduler and every RNG
    from its checkpoint, and the rewards come from the same reward model on the same
    texts, scored one request at a time (one job runs at a time here, so the batcher never
    mixes texts of two requests into one padded batch).
    """
    assert job["status"] == "succeeded", f"{job['error']}\n{site.log_tails()}"
    assert job["step"] == STEPS
    rows = client.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    assert [trainer_numbers(m) for m in rows] == [trainer_numbers(m) for m in reference.metrics]
    final, ref = job["metrics"], reference.job["metrics"]
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg"):
        assert final[key] == ref[key], key
    assert trainer_numbers(final) == trainer_numbers(ref)


# ---- the cases --------------------------------------------------------------------------------


def test_a_killed_worker_restarts_from_its_checkpoint(live: Live) -> None:
    site = live.site
    with live.server.http() as client:
        job_id = submit(client)
        first = site.worker(job_id, attempt=1)
        checkpoint = first_checkpoint(client, site, job_id)
        first.kill()
        job = wait_terminal(client, site, job_id)
        assert_same_run(client, site, job, live)
        assert job["restarts"] == 1 and job["attempt"] == 2
        logs = [e["data"]["message"] for e in events(client, job_id) if e["type"] == "log"]
    restarts = [m for m in logs if m.startswith("worker died")]
    assert len(restarts) == 1, logs
    assert "SIGKILL" in restarts[0] and "(restart 1 of 1)" in restarts[0]
    since = int(restarts[0].split("restarting from step ")[1].split()[0])
    assert since >= checkpoint["data"]["step"] and since < STEPS


def test_restarts_exhausted_fail_the_job_and_resume_finishes_it(live: Live) -> None:
    site = live.site
    with live.server.http() as client:
        job_id = submit(client)
        first = site.worker(job_id, attempt=1)
        first_checkpoint(client, site, job_id)
        first.kill()
        site.worker(job_id, attempt=2).kill()  # the restart (1 of 1) dies too
        job = wait_terminal(client, site, job_id)
        assert job["status"] == "failed", site.log_tails()
        assert "SIGKILL" in job["error"] and "after 1 restarts (limit 1)" in job["error"]
        assert job["attempt"] == 2 and job["restarts"] == 1

        r = client.post(f"/v1/jobs/{job_id}/resume")
        assert r.status_code == 200, r.text
        job = wait_terminal(client, site, job_id)
        assert_same_run(client, site, job, live)
        assert job["attempt"] == 3 and job["restarts"] == 0 and job["error"] is None


def test_a_restarted_service_stops_the_stale_worker_and_resumes(
    live: Live, make_site: Callable[[], Site]
) -> None:
    site = make_site()
    [job_id], stale = crash_after_a_checkpoint(site)
    assert stale.alive()  # its own process group: the service's death leaves it running

    server = site.serve()  # start-up stops the stale worker before it serves
    assert not alive(stale.pid, stale.start), "the stale worker outlived the restart"
    with server.http() as client:
        job = wait_terminal(client, site, job_id)
        assert_same_run(client, site, job, live)
        assert job["attempt"] == 2 and job["restarts"] == 0
        reasons = [e["data"].get("reason") for e in events(client, job_id) if e["type"] == "status"]
    assert any("the service restarted" in (r or "") for r in reasons), reasons


def test_a_job_running_in_the_store_with_its_worker_gone_resumes(
    live: Live, make_site: Callable[[], Site]
) -> None:
    site = make_site()
    [job_id], worker = crash_after_a_checkpoint(site)
    worker.kill()
    [row] = job_rows(site.data_dir)
    assert row["status"] == "running" and row["attempt"] == 1

    server = site.serve()
    with server.http() as client:
        job = wait_terminal(client, site, job_id)
        assert_same_run(client, site, job, live)
        assert job["attempt"] == 2


def test_queued_jobs_survive_a_service_kill(live: Live, make_site: Callable[[], Site]) -> None:
    site = make_site()
    [first, second], _ = crash_after_a_checkpoint(site, "--max-running-jobs", "1", jobs=2)
    assert [r["status"] for r in job_rows(site.data_dir)] == ["running", "queued"]

    server = site.serve("--max-running-jobs", "1")
    with server.http() as client:
        jobs = [wait_terminal(client, site, job_id) for job_id in (first, second)]
        for job in jobs:
            assert_same_run(client, site, job, live)
    assert [j["attempt"] for j in jobs] == [2, 1]
    assert jobs[1]["started_at"] >= jobs[0]["ended_at"]  # in order, one at a time


def test_a_broken_jobs_store_turns_readiness_off_until_it_is_back(live: Live) -> None:
    """The scheduler loop's supervised death, from outside: the jobs table vanishes under
    the running service (renamed by another connection), so every round of the loop fails;
    /readyz answers 503 naming `jobs` and gRPC health says NOT_SERVING while it restarts
    with backoff, and both come back once the table does. (Giving up for good, after the
    restarts run out, is tests/unit/test_job_manager_death.py's.)"""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = live.server
    db = sqlite3.connect(live.site.data_dir / "jobs.sqlite", timeout=10)

    def until(pred: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 20
        while not pred():
            assert time.monotonic() < deadline, f"{what}\n{server.log_tail()}"
            time.sleep(0.02)

    with server.http() as client, grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            req = health_pb2.HealthCheckRequest(service="")
            return health.Check(req, timeout=5).status == health_pb2.HealthCheckResponse.SERVING

        failed: dict[str, Any] = {}

        def not_ready() -> bool:
            r = client.get("/readyz")
            if r.status_code == 503:
                failed.update(r.json()["failed"])
            return r.status_code == 503

        try:
            db.execute("ALTER TABLE jobs RENAME TO jobs_away")
            db.commit()
            until(not_ready, "/readyz stayed 200")
            assert "jobs scheduler failed" in failed["jobs"], failed
            until(lambda: not serving(), "gRPC health stayed SERVING")
        finally:
            db.execute("ALTER TABLE jobs_away RENAME TO jobs")
            db.commit()
            db.close()
        until(lambda: client.get("/readyz").status_code == 200, "/readyz never 200 again")
        until(serving, "gRPC health never SERVING again")
        assert client.get(f"/v1/jobs/{live.job['id']}").json()["status"] == "succeeded"
