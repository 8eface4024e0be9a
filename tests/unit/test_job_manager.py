"""JobManager over the real store and the real Runtime (keyring, repository, scoring engine),
with an in-process FAKE runner and a simple validator injected.

The fake runner stands in for worker processes so that a test can drive the worker's side
exactly: its reports (the manager's `report`, as the REST route calls it) and its death
(an exit code the next poll sees). The real LocalRunner is tested on real processes in
test_local_runner.py, the real worker and specs after the jobs API is merged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from builders import build_tiny_rm
from rewardserve.config import Settings
from rewardserve.jobs.manager import JobManager
from rewardserve.jobs.runners.base import Launch, WorkerState
from rewardserve.runtime import Runtime
from rewardserve.schemas.errors import Conflict, InvalidArgument, NotFound, Unauthenticated
from rewardserve.schemas.jobs import JobCreate, JobEvent, Resources, WorkerReport

ADMIN_KEY = "admin-key-for-tests"


@dataclass
class Machine:
    """Worker 'processes' that outlive one manager (as real ones outlive a service)."""

    alive: dict[str, bool] = field(default_factory=dict)


class FakeRunner:
    name = "fake"

    def __init__(self, machine: Machine | None = None) -> None:
        self.machine = machine or Machine()
        self.launches: list[Launch] = []
        self.refs: list[str] = []
        self.ended: dict[str, WorkerState] = {}
        self.stopped: list[tuple[str, float]] = []

    def check(self, resources: Resources) -> None:
        if resources.gpus > 0:
            raise InvalidArgument("no GPUs here", field="resources.gpus")

    async def launch(self, launch: Launch) -> str:
        ref = f"fake:{launch.job_id}:{launch.attempt}"
        self.launches.append(launch)
        self.refs.append(ref)
        self.machine.alive[ref] = True
        return ref

    def die(self, ref: str, code: int, reason: str | None = None) -> None:
        self.machine.alive[ref] = False
        self.ended[ref] = WorkerState("exited", exit_code=code, reason=reason)

    async def poll(self, ref: str) -> WorkerState:
        if self.machine.alive.get(ref):
            return WorkerState("running")
        return self.ended.get(ref, WorkerState("gone", reason="gone"))

    async def stop(self, ref: str, grace_s: float) -> None:
        self.stopped.append((ref, grace_s))
        if self.machine.alive.get(ref):
            self.die(ref, -15, "killed by SIGTERM")

    async def logs(self, ref: str, log_path: Path) -> str:
        return f"logs of {ref}"

    async def close(self) -> None:
        pass


@dataclass
class Validated:
    config: dict[str, Any]
    total_steps: int


def validate(req: JobCreate, job_id: str, settings: Settings, runtime: Any) -> Validated:
    steps = req.config.get("total_steps", 3)
    if not isinstance(steps, int) or steps < 1:
        raise InvalidArgument("total_steps must be a positive integer", field="config.total_steps")
    return Validated({"total_steps": steps, "seed": 0, **req.config}, steps)


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def settings_for(tmp_path: Path, **kw: Any) -> Settings:
    repo = tmp_path / "models"
    repo.mkdir(exist_ok=True)
    return Settings(
        model_repository=repo,
        cache_dir=tmp_path / "cache",
        data_dir=tmp_path / "data",
        jobs_enabled=False,  # the runtime builds none: each test builds its own
        api_keys=[ADMIN_KEY],
        torch_threads=1,
        job_stop_grace_s=0.5,
        **kw,
    )


class Harness:
    def __init__(self, settings: Settings, runtime: Runtime, machine: Machine) -> None:
        self.settings, self.runtime, self.machine = settings, runtime, machine
        self.runner = FakeRunner(machine)
        self.manager = JobManager(settings, runtime, runner=self.runner, validate=validate)

    async def start(self, endpoints: bool = True) -> None:
        await self.manager.start()
        if endpoints:
            self.manager.set_endpoints("http://127.0.0.1:1234/", "127.0.0.1:5678")

    def launches_of(self, job_id: str) -> list[Launch]:
        return [la for la in self.runner.launches if la.job_id == job_id]

    def ref(self, job_id: str) -> str:
        last = self.launches_of(job_id)[-1]
        return f"fake:{job_id}:{last.attempt}"

    async def report(self, job_id: str, kind: str, attempt: int | None = None, **kw: Any) -> None:
        if attempt is None:
            attempt = (await self.manager.get(job_id)).attempt
        await self.manager.report(job_id, WorkerReport(attempt=attempt, kind=kind, **kw))

    async def first_running_after_a_step(self, jobs: int) -> list[str]:
        """Submit `jobs` jobs; the first is launched and has reported its step 1."""
        ids = [(await self.manager.create(ppo(total_steps=5)))[0].id for _ in range(jobs)]
        await until(lambda: len(self.runner.launches) == 1)
        await self.report(ids[0], "step", step=1, metrics={"reward": 0.1})
        return ids

    async def status(self, job_id: str) -> str:
        return (await self.manager.get(job_id)).status


@pytest_asyncio.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Harness]]:
    harnesses: list[Harness] = []
    runtimes: list[Runtime] = []
    machine = Machine()

    def build(**kw: Any) -> Harness:
        settings = settings_for(tmp_path, **kw)
        runtime = Runtime(settings)
        runtimes.append(runtime)
        h = Harness(settings, runtime, machine)
        harnesses.append(h)
        return h

    yield build
    for h in harnesses:
        if not h.manager._closed:
            await h.manager.close()
    for rt in runtimes:
        await rt.scoring.close()


def ppo(**config: Any) -> JobCreate:
    return JobCreate(type="ppo", config=config, prompts=["hi"])


async def test_queue_order_limit_command_and_worker_keys(make) -> None:
    h = make(max_running_jobs=2, job_torch_threads=2)
    await h.start(endpoints=False)
    ids = [(await h.manager.create(ppo(total_steps=3)))[0].id for _ in range(3)]
    h.manager.wake()
    await asyncio.sleep(0.2)
    assert h.runner.launches == []  # no worker before the service knows its own ports
    h.manager.set_endpoints("http://127.0.0.1:1234/", "127.0.0.1:5678")
    await until(lambda: len(h.runner.launches) == 2)
    assert [la.job_id for la in h.runner.launches] == ids[:2]
    assert [await h.status(i) for i in ids] == ["running", "running", "queued"]

    first = h.runner.launches[0]
    assert first.command[1:] == [
        "-m",
        "rewardserve.jobs.worker",
        "--job-id",
        ids[0],
        "--attempt",
        "1",
        "--rest",
        "http://127.0.0.1:1234",
        "--grpc",
        "127.0.0.1:5678",
    ]  # a fresh job's first attempt: no --resume
    assert first.env["OMP_NUM_THREADS"] == first.env["MKL_NUM_THREADS"] == "2"
    assert first.env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert (Path(first.env["PYTHONPATH"].split(":")[0]) / "rewardserve").is_dir()
    assert first.log_path == h.settings.data_dir.resolve() / "jobs" / ids[0] / "worker.log"
    key = first.env["REWARDSERVE_WORKER_API_KEY"]
    keyring = h.runtime.keyring
    assert "admin" in keyring.authorize(f"Bearer {key}", "admin")

    job = await h.manager.get(ids[0])
    assert job.started_at is not None and job.attempt == 1
    await h.report(ids[0], "started", total_steps=7)
    assert (await h.manager.get(ids[0])).total_steps == 7
    await h.report(ids[0], "failed", error="Traceback: boom")
    job = await h.manager.get(ids[0])
    assert job.status == "failed" and job.error == "Traceback: boom" and job.ended_at
    with pytest.raises(Unauthenticated):  # the attempt's key ends with it
        keyring.authorize(f"Bearer {key}", "admin")
    await until(lambda: len(h.runner.launches) == 3)  # the freed slot goes to the third
    assert h.runner.launches[2].job_id == ids[2]
    assert h.runner.refs[0] not in [r for r, _ in h.runner.stopped]  # it exits by itself


async def test_dead_worker_restarts_from_checkpoint_then_fails(make) -> None:
    h = make(job_max_restarts=2)
    await h.start()
    job_id = (await h.manager.create(ppo(total_steps=5)))[0].id
    await until(lambda: len(h.runner.launches) == 1)
    await h.report(job_id, "started", total_steps=5)
    for step in (1, 2):
        await h.report(job_id, "step", step=step, metrics={"reward": step / 10})
    await h.report(job_id, "checkpoint", step=2, checkpoint="/out/checkpoints/step-2")
    await h.report(job_id, "step", step=3, metrics={"reward": 0.3})

    h.runner.die(h.ref(job_id), -9, "killed by SIGKILL (out of memory or kill -9?)")
    h.manager.wake()
    await until(lambda: len(h.runner.launches) == 2)
    second = h.runner.launches[1]
    assert second.command[second.command.index("--attempt") + 1] == "2"
    assert second.command[-1] == "--resume"
    job = await h.manager.get(job_id)
    assert (job.status, job.attempt, job.restarts) == ("running", 2, 1)
    with pytest.raises(Conflict) as err:  # the dead attempt's reports are refused
        await h.report(job_id, "step", attempt=1, step=4, metrics={})
    assert err.value.field == "attempt"

    # The resumed attempt redoes step 3: the stored row is replaced, not doubled.
    await h.report(job_id, "step", step=3, metrics={"reward": 0.33})
    assert [m["step"] for m in await h.manager.metrics(job_id)] == [1, 2, 3]
    assert (await h.manager.metrics(job_id))[-1]["reward"] == 0.33

    h.runner.die(h.ref(job_id), 1, "exited with code 1")
    h.manager.wake()
    await until(lambda: len(h.runner.launches) == 3)
    h.runner.die(h.ref(job_id), -9, "killed by SIGKILL (out of memory or kill -9?)")
    h.manager.wake()
    await until(lambda: h.manager.store.get(job_id).job.status == "failed")
    job = await h.manager.get(job_id)
    assert "killed by SIGKILL" in job.error and "2 restarts" in job.error
    assert [c.step for c in job.checkpoints] == [2]
    logs = [e.data["message"] for e in h.manager.store.events_after(job_id) if e.type == "log"]
    restarts = [m for m in logs if m.startswith("worker died")]
    assert restarts == [
        "worker died (killed by SIGKILL (out of memory or kill -9?)): restarting from step 2 "
        "(restart 1 of 2)",
        "worker died (exited with code 1): restarting from step 2 (restart 2 of 2)",
    ]


async def test_exit_0_without_a_final_report_fails(make) -> None:
    h = make()
    await h.start()
    job_id = (await h.manager.create(ppo()))[0].id
    await until(lambda: len(h.runner.launches) == 1)
    h.runner.die(h.ref(job_id), 0, "exited with code 0")
    h.manager.wake()
    await until(lambda: h.manager.store.get(job_id).job.status == "failed")
    assert "code 0 without reporting" in (await h.manager.get(job_id)).error
    assert len(h.runner.launches) == 1


async def test_cancel_and_resume(make) -> None:
    h = make()
    await h.start()
    job_id, queued_id = await h.first_running_after_a_step(2)
    await h.report(job_id, "checkpoint", step=1, checkpoint="/ckpt/1")

    cancelled = await h.manager.cancel(queued_id)  # never started: nothing to stop
    assert cancelled.status == "cancelled" and h.runner.stopped == []
    job = await h.manager.cancel(job_id)
    assert job.status == "cancelled" and job.ended_at is not None
    assert h.runner.stopped == [(h.ref(job_id), 0.5)]
    assert [c.step for c in job.checkpoints] == [1]  # checkpoints are kept
    for call in (h.manager.cancel, h.manager.resume):
        with pytest.raises(NotFound):
            await call("job-000000000000")
    with pytest.raises(Conflict):
        await h.manager.cancel(job_id)
    with pytest.raises(Conflict):  # a stopped worker's late report
        await h.report(job_id, "step", attempt=1, step=2, metrics={})

    resumed = await h.manager.resume(job_id)
    assert resumed.status == "queued" and resumed.error is None and resumed.ended_at is None
    await until(lambda: len(h.runner.launches) == 2)
    assert h.runner.launches[1].command[-1] == "--resume"
    job = await h.manager.get(job_id)
    assert (job.status, job.attempt, job.restarts) == ("running", 2, 0)
    with pytest.raises(Conflict):
        await h.manager.resume(job_id)  # running: nothing to resume


async def test_submission_idempotency_and_refusals(make) -> None:
    h = make()
    await h.start(endpoints=False)
    req = ppo(total_steps=3).model_copy(update={"idempotency_key": "run-1"})
    job, created = await h.manager.create(req)
    same, created_again = await h.manager.create(
        JobCreate.model_validate_json(req.model_dump_json())
    )
    assert created and not created_again and same == job
    with pytest.raises(Conflict) as err:
        await h.manager.create(req.model_copy(update={"config": {"total_steps": 4}}))
    assert err.value.field == "idempotency_key"
    with pytest.raises(InvalidArgument) as err:
        await h.manager.create(ppo(total_steps=0))
    assert err.value.field == "config.total_steps"
    with pytest.raises(InvalidArgument) as err:
        await h.manager.create(ppo().model_copy(update={"resources": Resources(gpus=1)}))
    assert err.value.field == "resources.gpus"
    listed = await h.manager.list()
    assert [j.id for j in listed.data] == [job.id]  # the refused ones left nothing behind
    assert job.config == {"total_steps": 3, "seed": 0}  # as validated
    with pytest.raises(NotFound) as err:
        await h.manager.get("job-000000000000")
    assert err.value.field == "id"


async def test_recovery_after_a_service_restart(make) -> None:
    old = make()
    await old.start()
    running, waiting = await old.first_running_after_a_step(2)
    await old.manager.close()  # its worker keeps running, as a real one outlives the service
    old_ref = old.ref(running)
    assert old.machine.alive[old_ref]

    new = make()
    await new.start()
    assert new.runner.stopped == [(old_ref, 0.5)]  # two workers never train one job
    await until(lambda: len(new.runner.launches) == 1)
    launch = new.runner.launches[0]
    assert launch.job_id == running and launch.command[-1] == "--resume"
    job = await new.manager.get(running)
    assert (job.status, job.attempt, job.restarts, job.step) == ("running", 2, 0, 1)
    statuses = [e.data for e in new.manager.store.events_after(running) if e.type == "status"]
    assert statuses[-2]["status"] == "queued" and "restarted" in statuses[-2]["reason"]
    assert await new.status(waiting) == "queued"  # max_running_jobs is 1
    await new.report(running, "failed", error="x")
    await until(lambda: len(new.runner.launches) == 2)
    assert new.runner.launches[1].job_id == waiting
    assert "--resume" not in new.runner.launches[1].command


async def collect(events: AsyncIterator[JobEvent], into: list[JobEvent]) -> None:
    async for e in events:
        into.append(e)


async def test_events_replay_then_live_then_end(make) -> None:
    h = make()
    await h.start()
    job_id = (await h.manager.create(ppo(total_steps=3)))[0].id
    await until(lambda: len(h.runner.launches) == 1)
    await h.report(job_id, "step", step=1, metrics={"reward": 0.1})
    seen: list[JobEvent] = []
    watcher = asyncio.create_task(collect(h.manager.events(job_id), seen))
    await until(lambda: len(seen) == 3)  # queued, running, step 1: replayed
    await h.report(
        job_id,
        "step",
        step=2,
        metrics={"reward": 0.2},
        samples=[{"prompt": "p", "response": "r", "reward": 1.0}],
    )
    await until(lambda: len(seen) == 4)
    assert seen[-1].data["samples"] == [{"prompt": "p", "response": "r", "reward": 1.0}]
    assert not watcher.done()
    await h.report(job_id, "failed", error="boom")
    await asyncio.wait_for(watcher, 5)  # ends after the terminal status event
    assert [e.type for e in seen] == ["status", "status", "step", "step", "status"]
    assert seen[-1].data == {"status": "failed", "error": "boom"}
    ids = [e.id for e in seen]
    assert ids == sorted(ids)

    # A reconnecting client resumes after the id it saw; a finished job's stream ends.
    again: list[JobEvent] = []
    await asyncio.wait_for(collect(h.manager.events(job_id, after=ids[2]), again), 5)
    assert [e.id for e in again] == ids[3:]
    with pytest.raises(NotFound):
        h.manager.events("job-000000000000")


async def test_succeeded_reward_job_loads_its_model(make) -> None:
    h = make()
    await h.start()
    ok = (await h.manager.create(JobCreate(type="reward", config={"total_steps": 2})))[0].id
    await until(lambda: len(h.runner.launches) == 1)
    # What the worker does before it reports: write the model into the repository.
    build_tiny_rm(h.settings.model_repository, "trained-rm", max_length=32)
    await h.report(ok, "succeeded", result={"model": "trained-rm", "accuracy": 0.5})
    job = await h.manager.get(ok)
    assert job.status == "succeeded" and job.result == {"model": "trained-rm", "accuracy": 0.5}
    assert "trained-rm" in h.runtime.scoring.models  # it scores at once
    status = h.manager.store.events_after(ok)[-1]
    assert status.data == {"status": "succeeded", "result": job.result}

    bad = (await h.manager.create(JobCreate(type="reward", config={"total_steps": 2})))[0].id
    await until(lambda: len(h.runner.launches) == 2)
    await h.report(bad, "succeeded", result={"model": "not-written"})
    job = await h.manager.get(bad)
    assert job.status == "failed" and "registering the result failed" in job.error
    assert "not-written" in job.error


async def test_logs_and_metrics(make) -> None:
    h = make()
    await h.start(endpoints=False)
    job_id = (await h.manager.create(ppo()))[0].id
    log = h.manager.log_path(job_id)
    log.parent.mkdir(parents=True)
    log.write_text("line one\nline two\n")
    assert await h.manager.logs(job_id) == "line one\nline two\n"  # no worker yet: the file
    assert await h.manager.logs(job_id, tail_bytes=9) == "line two\n"
    assert await h.manager.metrics(job_id) == []
    h.manager.set_endpoints("http://h:1", "h:2")
    await until(lambda: len(h.runner.launches) == 1)
    assert await h.manager.logs(job_id) == f"logs of {h.ref(job_id)}"


async def test_the_loop_is_supervised(make) -> None:
    h = make()
    await h.start()
    h.manager.loop_restart_backoff_s = 0.2
    changes: list[bool] = []
    h.manager.readiness_listeners.append(lambda: changes.append(h.manager.ready))
    assert h.manager.ready
    store = h.manager.store
    store.close()  # the database goes away under the loop: its next round fails
    h.manager.wake()
    await until(lambda: not h.manager.ready)
    assert "jobs scheduler failed" in h.manager.failure
    h.runtime.jobs = h.manager  # as the runtime holds it when jobs are enabled
    assert h.runtime.failures()["jobs"] == h.manager.failure
    assert "restarting (1 of 5)" in h.manager.failure
    h.manager.store = type(store)(store.path)  # back: the restarted loop serves again
    await until(lambda: h.manager.ready)
    assert changes[0] is False and changes[-1] is True
    assert "jobs" not in h.runtime.failures()
    job_id = (await h.manager.create(ppo()))[0].id
    await until(lambda: len(h.launches_of(job_id)) == 1)


async def test_the_server_gives_workers_the_bound_ports(tmp_path: Path) -> None:
    """With port 0 on both transports, workers get the ports the OS picked."""
    import uvicorn

    from rewardserve.grpc.server import GrpcServer
    from rewardserve.http.app import build_app
    from rewardserve.server import _tell_jobs_the_endpoints

    settings = settings_for(tmp_path, port=0, grpc_port=0, host="127.0.0.1")
    settings = settings.model_copy(update={"jobs_enabled": True})
    runtime = Runtime(settings)
    assert runtime.jobs is not None and runtime.jobs.endpoints is None
    http = uvicorn.Server(uvicorn.Config(build_app(settings, runtime), port=0, log_level="error"))
    grpc_server = GrpcServer(settings, runtime)
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve())
    try:
        await _tell_jobs_the_endpoints(settings, runtime.jobs, http, http_task, grpc_server)
        rest_url, grpc_address = runtime.jobs.endpoints
        bound = http.servers[0].sockets[0].getsockname()[1]
        assert bound != 0 and rest_url == f"http://127.0.0.1:{bound}"
        assert grpc_server.port != 0 and grpc_address == f"127.0.0.1:{grpc_server.port}"
    finally:
        http.should_exit = True
        await http_task
        await grpc_server.stop(0)


def test_a_prompt_string_and_its_object_form_are_one_submission() -> None:
    """REST clients send "hi", gRPC sends PromptInput(prompt="hi"): one idempotency key must
    see them as the same body."""
    from rewardserve.jobs.manager import request_hash

    as_text = JobCreate(
        type="ppo", prompts=["hi", {"messages": [{"role": "user", "content": "x"}]}]
    )
    as_object = JobCreate(
        type="ppo", prompts=[{"prompt": "hi"}, {"messages": [{"role": "user", "content": "x"}]}]
    )
    assert request_hash(as_text) == request_hash(as_object)
    assert request_hash(as_text) != request_hash(JobCreate(type="ppo", prompts=["ho"]))
    # a prompt the validator will refuse must not break hashing first (that was a 500)
    assert request_hash(JobCreate(type="ppo", prompts=[""]))
