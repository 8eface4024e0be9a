"""The jobs manager: submission, the queue, one supervised scheduler loop, worker reports.

State lives in the JobStore; this class keeps only what a restart may lose (the workers'
per-attempt API keys, locks, watchers). A job's life: queued -> running (its attempt's
worker launched) -> succeeded / failed / cancelled. Each attempt has a number; a report from
any other attempt is refused, so a worker left over from a restart or a stop can never write
into the job (it exits on the 409).

The loop (woken by changes, else every POLL_S) polls running jobs' workers and starts queued
jobs in submission order while fewer than --max-running-jobs run. A worker that ended without
a final report died: it is restarted from its newest checkpoint up to --job-max-restarts
times, then the job fails with the reason. The loop is supervised like the batcher's: if it
dies it restarts with backoff, and `ready`/`failure` say so meanwhile (for /readyz).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rewardserve.config import Settings
from rewardserve.jobs.runners.base import Launch, Runner, worker_pythonpath
from rewardserve.jobs.runners.local import read_tail, threads_for
from rewardserve.jobs.store import JobRecord, JobStore, now
from rewardserve.schemas.bon import PromptInput
from rewardserve.schemas.errors import Conflict, InvalidArgument, NotFound, ServiceError
from rewardserve.schemas.evaluation import Evaluation
from rewardserve.schemas.job_query import MAX_LIMIT as MAX_LIST_LIMIT  # what the API documents
from rewardserve.schemas.jobs import TERMINAL, Job, JobCreate, JobEvent, JobList, WorkerReport
from rewardserve.supervision import SupervisedLoop

if TYPE_CHECKING:
    from rewardserve.runtime import Runtime

log = logging.getLogger("rewardserve.jobs")

POLL_S = 0.5
LINGER_S = 30.0
"""How long a worker that sent its final report may take to exit before it is stopped."""
WATCH_RECHECK_S = 5.0


class ValidatedJobLike(Protocol):
    config: dict[str, Any]
    total_steps: int


Validator = Callable[[JobCreate, str, Settings, Any], ValidatedJobLike]


def _validate_submission(
    req: JobCreate, job_id: str, settings: Settings, runtime: Any
) -> ValidatedJobLike:
    from rewardserve.jobs.specs import validate_submission  # late: it imports the trainers (torch)

    return validate_submission(req, job_id, settings, runtime)


# A prompt object's fields as a bare string leaves them (every one optional, None).
_PROMPT_DEFAULTS: dict[str, Any] = {name: None for name in PromptInput.model_fields}


def request_hash(req: JobCreate) -> str:
    """A canonical digest of a submission (key order, defaults and the spelling of a prompt do
    not change it: "hi" and {"prompt": "hi"} are one prompt, as REST and gRPC send it)."""
    body = req.model_dump(mode="json", exclude={"idempotency_key"})
    if body.get("prompts"):
        body["prompts"] = [
            # by hand, not PromptInput(prompt=p): a bad prompt ("") is the validator's to refuse
            {**_PROMPT_DEFAULTS, "prompt": p} if isinstance(p, str) else p
            for p in body["prompts"]
        ]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex[:12]


def make_runner(settings: Settings) -> Runner:
    if settings.job_runner == "ray":
        from rewardserve.jobs.runners.ray import RayRunner  # optional dependency

        return RayRunner(settings)  # type: ignore[no-any-return]
    from rewardserve.jobs.runners.local import LocalRunner

    return LocalRunner(nice=settings.job_nice)


def service_host(settings: Settings) -> str:
    """The host workers reach this service at."""
    if settings.job_service_host:
        return settings.job_service_host
    host = settings.host.strip("[]")
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else settings.host


@dataclass
class _Endpoints:
    rest_url: str
    grpc_address: str


class JobManager:
    def __init__(
        self,
        settings: Settings,
        runtime: Runtime,
        *,
        runner: Runner | None = None,
        validate: Validator | None = None,
        max_loop_restarts: int = 5,
        loop_restart_backoff_s: float = 0.5,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.runner = runner if runner is not None else make_runner(settings)
        self._validate = validate or _validate_submission
        # Absolute: the paths go to workers, which may run elsewhere (Ray) or elsewhere's cwd.
        self.data_dir = Path(settings.data_dir).resolve()
        self.store: JobStore | None = None
        self._endpoints: _Endpoints | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._locks: dict[str, asyncio.Lock] = {}
        self._keys: dict[str, str] = {}  # job id -> its current attempt's worker key
        self._lingering: dict[str, float] = {}  # ref -> when to stop it (final report sent)
        self._latest: dict[str, int] = {}  # job id -> newest event id appended
        self._watch = asyncio.Condition()
        self.readiness_listeners: list[Callable[[], None]] = []
        """Told when `ready` may have changed (the gRPC health service follows it)."""
        self._loop = SupervisedLoop(
            "jobs scheduler",
            self._run,
            max_restarts=max_loop_restarts,
            backoff_s=loop_restart_backoff_s,
            logger=log,
            listeners=self.readiness_listeners,
        )

    @property
    def failure(self) -> str | None:
        """Why the scheduler loop is down (None while it runs)."""
        return self._loop.failure

    @property
    def gave_up(self) -> bool:
        return self._loop.gave_up

    @property
    def loop_restarts(self) -> int:
        return self._loop.restarts

    @property
    def loop_restart_backoff_s(self) -> float:
        return self._loop.backoff_s

    @loop_restart_backoff_s.setter
    def loop_restart_backoff_s(self, value: float) -> None:
        self._loop.backoff_s = value

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        (self.data_dir / "jobs").mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.data_dir / "jobs.sqlite")
        await self._recover()
        self._loop.start("jobs-scheduler")

    async def close(self) -> None:
        """Stop the loop and close the store. Workers keep running: the next start stops
        them and restarts their jobs from their checkpoints."""
        self._closed = True
        await self._loop.close()
        for key in self._keys.values():
            self.runtime.keyring.revoke(key)
        self._keys.clear()
        await self.runner.close()
        if self.store is not None:
            self.store.close()
        async with self._watch:
            self._watch.notify_all()

    def set_endpoints(self, rest_url: str, grpc_address: str) -> None:
        """Where workers reach this service (the bound ports); no worker starts before."""
        self._endpoints = _Endpoints(rest_url.rstrip("/"), grpc_address)
        self._wake.set()

    @property
    def endpoints(self) -> tuple[str, str] | None:
        """(REST URL, gRPC address) workers are given; None until set_endpoints."""
        e = self._endpoints
        return None if e is None else (e.rest_url, e.grpc_address)

    def wake(self) -> None:
        """Ask the loop for a round now (instead of at its next poll)."""
        self._wake.set()

    @property
    def ready(self) -> bool:
        return self._loop.running and self.failure is None

    # ---- submission and queries ------------------------------------------------------------

    def _db(self) -> JobStore:
        if self.store is None:
            raise ServiceError("the jobs manager is not started")
        return self.store

    def _record(self, job_id: str) -> JobRecord:
        rec = self._db().get(job_id)
        if rec is None:
            raise NotFound(f"no job '{job_id}'", field="id")
        return rec

    def _lock(self, job_id: str) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    async def create(self, req: JobCreate) -> tuple[Job, bool]:
        store = self._db()
        digest = request_hash(req)
        if req.idempotency_key is not None:
            existing = store.get_by_key(req.idempotency_key)
            if existing is not None:
                return self._replay(existing, digest), False
        self.runner.check(req.resources)
        job_id = new_job_id()
        validated = await asyncio.to_thread(
            self._validate, req, job_id, self.settings, self.runtime
        )
        job = Job(
            id=job_id,
            type=req.type,
            status="queued",
            created_at=now(),
            config=validated.config,
            resources=req.resources,
            total_steps=validated.total_steps,
            idempotency_key=req.idempotency_key,
        )
        rec, event, created = store.insert(job, request_hash=digest)
        if not created:  # another submission took the key meanwhile
            return self._replay(rec, digest), False
        assert event is not None
        await self._published(event)
        self._wake.set()
        log.info("job %s (%s) queued", job_id, req.type)
        return rec.job, True

    @staticmethod
    def _replay(rec: JobRecord, digest: str) -> Job:
        if rec.request_hash != digest:
            raise Conflict(
                f"idempotency_key '{rec.job.idempotency_key}' was used by job {rec.job.id} "
                "with another request body",
                field="idempotency_key",
            )
        return rec.job

    async def get(self, job_id: str) -> Job:
        return self._record(job_id).job

    async def list(
        self,
        *,
        status: list[str] | None = None,
        type: str | None = None,
        limit: int = 50,
        page_token: str | None = None,
    ) -> JobList:
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidArgument(f"limit must be 1 to {MAX_LIST_LIMIT}", field="limit")
        return self._db().list(status=status, type=type, limit=limit, page_token=page_token)

    async def metrics(self, job_id: str) -> list[dict[str, Any]]:
        self._record(job_id)
        return self._db().metrics(job_id)

    async def logs(self, job_id: str, tail_bytes: int | None = None) -> str:
        rec = self._record(job_id)
        path = self.log_path(job_id)
        if rec.runner_ref is not None:
            text = await self.runner.logs(rec.runner_ref, path)
        else:
            text = await asyncio.to_thread(read_tail, path, tail_bytes)
        if tail_bytes is not None:
            data = text.encode()
            text = data[max(0, len(data) - tail_bytes) :].decode("utf-8", errors="replace")
        return text

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    def log_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "worker.log"

    # ---- cancel and resume -------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Job:
        self._record(job_id)
        async with self._lock(job_id):
            rec = self._record(job_id)
            status = rec.job.status
            if status in TERMINAL:
                raise Conflict(f"job {job_id} is already {status}", field="id")
            if status == "running" and rec.runner_ref is not None:
                await self.runner.stop(rec.runner_ref, self.settings.job_stop_grace_s)
                self._forget(rec.runner_ref)
            self._revoke(job_id)
            job = await self._set_status(job_id, "cancelled", ended_at=now())
        log.info("job %s cancelled", job_id)
        self._wake.set()
        return job

    async def resume(self, job_id: str) -> Job:
        self._record(job_id)
        async with self._lock(job_id):
            rec = self._record(job_id)
            if rec.job.status not in ("cancelled", "failed"):
                raise Conflict(
                    f"job {job_id} is {rec.job.status}: only a cancelled or failed job resumes",
                    field="id",
                )
            job = await self._set_status(
                job_id,
                "queued",
                resume=True,
                restarts=0,
                error=None,
                ended_at=None,
                event_extra={"reason": "resumed"},
            )
        self._wake.set()
        return job

    # ---- events ------------------------------------------------------------------------------

    def events(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
        """Stored events with id > after, then live ones; ends once the job is terminal and
        every event is out. NotFound at once (before iterating) when there is no such job."""
        self._record(job_id)
        return self._events(job_id, after)

    async def _events(self, job_id: str, after: int) -> AsyncIterator[JobEvent]:
        last = after
        while True:
            batch = self._db().events_after(job_id, last)
            for event in batch:
                last = event.id
                yield event
            if batch:
                continue
            rec = self._db().get(job_id)
            if rec is None or rec.job.status in TERMINAL or self._closed:
                return

            def arrived(seen: int = last) -> bool:
                return self._latest.get(job_id, 0) > seen or self._closed

            # The timeout only makes it look at the store again, whatever it missed.
            async with self._watch:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WATCH_RECHECK_S):
                        await self._watch.wait_for(arrived)

    async def _published(self, *events: JobEvent) -> None:
        if not events:
            return
        for e in events:
            self._latest[e.job_id] = max(self._latest.get(e.job_id, 0), e.id)
        async with self._watch:
            self._watch.notify_all()

    async def _update(
        self, job_id: str, events: list[tuple[str, dict[str, Any]]] | None = None, **fields: Any
    ) -> JobRecord:
        rec, appended = self._db().update(job_id, fields, events or [])
        await self._published(*appended)
        return rec

    async def _set_status(
        self,
        job_id: str,
        status: str,
        *,
        event_extra: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Job:
        data: dict[str, Any] = {"status": status}
        if fields.get("error"):
            data["error"] = fields["error"]
        if fields.get("result") is not None:
            data["result"] = fields["result"]
        data |= event_extra or {}
        rec = await self._update(job_id, [("status", data)], status=status, **fields)
        return rec.job

    async def _log_event(self, job_id: str, message: str) -> None:
        event = self._db().append_event(job_id, "log", {"message": message})
        await self._published(event)

    # ---- worker reports ----------------------------------------------------------------------

    async def report(self, job_id: str, report: WorkerReport) -> None:
        self._record(job_id)
        async with self._lock(job_id):
            rec = self._record(job_id)
            job = rec.job
            if job.status in TERMINAL:
                raise Conflict(f"job {job_id} is {job.status}", field="attempt")
            if report.attempt != job.attempt or job.status != "running":
                raise Conflict(
                    f"attempt {report.attempt} of job {job_id} is stale (the job's attempt "
                    f"is {job.attempt}); the worker should exit",
                    field="attempt",
                )
            await self._apply(rec, report)

    async def _apply(self, rec: JobRecord, report: WorkerReport) -> None:
        job_id = rec.job.id
        kind = report.kind
        if kind == "started":
            fields: dict[str, Any] = {}
            if report.total_steps is not None:
                fields["total_steps"] = report.total_steps
            if rec.job.started_at is None:
                fields["started_at"] = now()
            if fields:
                await self._update(job_id, **fields)
            await self._log_event(job_id, f"attempt {rec.job.attempt} started")
        elif kind == "step":
            if report.step is None:
                raise InvalidArgument("a step report needs its step", field="step")
            samples = [s.model_dump() for s in report.samples]
            _, event = self._db().record_step(job_id, report.step, report.metrics or {}, samples)
            await self._published(event)
        elif kind == "checkpoint":
            if report.step is None or not report.checkpoint:
                raise InvalidArgument(
                    "a checkpoint report needs its step and checkpoint path",
                    field="checkpoint" if report.step is not None else "step",
                )
            keep = rec.job.config.get("keep_checkpoints")
            _, event = self._db().record_checkpoint(
                job_id, report.step, report.checkpoint, keep=keep
            )
            await self._published(event)
        elif kind == "log":
            await self._log_event(job_id, report.message or "")
        elif kind == "failed":
            error = report.error or "the worker reported a failure without a message"
            await self._finish(rec, "failed", error=error)
        elif kind == "succeeded":
            result = dict(report.result or {})
            # the worker is done; loading its model (a vLLM engine for a policy) takes a while
            name = result.get("policy") or result.get("model")
            if rec.job.type == "reward_eval":
                message = f"the worker finished: recording its evaluation of {name}"
            else:
                message = f"the worker finished: loading {name} to serve it"
            await self._log_event(job_id, message)
            try:
                await self._register(rec.job, result)
            except Exception as e:
                why = e.message if isinstance(e, ServiceError) else f"{type(e).__name__}: {e}"
                log.error("job %s: registering its result failed: %s", job_id, why)
                await self._finish(rec, "failed", error=f"registering the result failed: {why}")
                return
            await self._finish(rec, "succeeded", result=result)

    async def _register(self, job: Job, result: dict[str, Any]) -> None:
        """Make a succeeded job's model servable (or record its evaluation) before the job
        says it succeeded."""
        if job.type == "reward_eval":
            # the store checks it is an evaluation; its path goes into the job's result
            e = Evaluation.model_validate(result.get("evaluation"))
            path = await asyncio.to_thread(self.runtime.evaluations.record, e)
            result["path"] = str(path)
        elif job.type == "ppo":
            policy = result.get("policy")
            if not policy:
                raise ValueError("the result names no policy")
            self.runtime.repository.rescan()
            await self.runtime.policies.load(policy)
        else:
            model = result.get("model")
            if not model:
                raise ValueError("the result names no model")
            await self.runtime.scoring.load(model)  # rescans the repository itself

    async def _finish(
        self, rec: JobRecord, status: str, *, error: str | None = None, result: Any = None
    ) -> None:
        self._revoke(rec.job.id)
        if rec.runner_ref is not None:
            self._lingering[rec.runner_ref] = time.monotonic() + LINGER_S
        await self._set_status(
            rec.job.id, status, ended_at=now(), error=error, result=result, resume=False
        )
        log.info("job %s %s%s", rec.job.id, status, f": {error}" if error else "")
        self._wake.set()

    def _revoke(self, job_id: str) -> None:
        key = self._keys.pop(job_id, None)
        if key is not None:
            self.runtime.keyring.revoke(key)

    def _forget(self, ref: str) -> None:
        self._lingering.pop(ref, None)
        forget = getattr(self.runner, "forget", None)
        if forget is not None:
            forget(ref)

    # ---- recovery ----------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Jobs a previous service left running go back to the queue (ahead of nothing: the
        queue is in submission order) and continue from their checkpoints; a worker of that
        service still alive is stopped first, so two never train one job."""
        for rec in self._db().by_status(["running"]):
            if rec.runner_ref is not None:
                try:
                    state = await self.runner.poll(rec.runner_ref)
                    if state.state in ("pending", "running"):
                        log.info("job %s: stopping the previous service's worker", rec.job.id)
                        await self.runner.stop(rec.runner_ref, self.settings.job_stop_grace_s)
                except Exception as e:  # a ref this runner cannot read: nothing to stop
                    log.warning("job %s: could not check its old worker: %s", rec.job.id, e)
            await self._set_status(
                rec.job.id,
                "queued",
                resume=True,
                event_extra={"reason": "the service restarted; resuming from a checkpoint"},
            )
            log.info("job %s: requeued after a service restart", rec.job.id)

    # ---- the scheduler loop ------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self.tick()
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the cancellation
            # of close() when it races the event being set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()
            self._wake.clear()

    async def tick(self) -> None:
        """One round: see which workers ended, then start what the queue allows."""
        await self._poll_running()
        await self._poll_lingering()
        await self._start_queued()

    async def _poll_running(self) -> None:
        for rec in self._db().by_status(["running"]):
            lock = self._lock(rec.job.id)
            if lock.locked() or rec.runner_ref is None:
                continue  # a report, a cancel or a launch is on it: look next round
            try:
                state = await self.runner.poll(rec.runner_ref)
            except Exception as e:  # the runner cannot tell now (Ray unreachable): next round
                log.warning("job %s: polling its worker failed: %s", rec.job.id, e)
                continue
            if state.state in ("pending", "running"):
                continue
            async with lock:
                now_rec = self._record(rec.job.id)
                if now_rec.job.status != "running" or now_rec.runner_ref != rec.runner_ref:
                    continue
                self._forget(rec.runner_ref)
                await self._worker_died(now_rec, state.exit_code, state.reason)

    async def _worker_died(self, rec: JobRecord, code: int | None, reason: str | None) -> None:
        job_id = rec.job.id
        self._revoke(job_id)
        if code == 0:
            # A worker that exits 0 ends its job by a report first; without one it is a
            # bug in the worker, which a restart would repeat.
            await self._finish(
                rec, "failed", error="the worker exited with code 0 without reporting an end"
            )
            return
        why = reason or (f"exited with code {code}" if code is not None else "gone")
        limit = self.settings.job_max_restarts
        if rec.job.restarts >= limit:
            error = f"the worker died ({why}) after {rec.job.restarts} restarts (limit {limit})"
            await self._finish(rec, "failed", error=error)
            return
        k = rec.job.restarts + 1
        since = max((c.step for c in rec.job.checkpoints), default=0)
        message = f"worker died ({why}): restarting from step {since} (restart {k} of {limit})"

        log.warning("job %s: %s", job_id, message)
        rec = await self._update(job_id, [("log", {"message": message})], restarts=k, resume=True)
        await self._launch(rec)

    async def _poll_lingering(self) -> None:
        for ref, deadline in list(self._lingering.items()):
            try:
                state = await self.runner.poll(ref)
            except Exception as e:
                log.warning("worker %s: polling failed: %s", ref, e)
                continue
            if state.state in ("exited", "gone"):
                self._forget(ref)
            elif time.monotonic() > deadline:
                log.warning("worker %s did not exit after its final report: stopping it", ref)
                await self.runner.stop(ref, self.settings.job_stop_grace_s)
                self._forget(ref)

    async def _start_queued(self) -> None:
        if self._endpoints is None:
            return
        running = self._db().count("running")
        for rec in self._db().by_status(["queued"]):
            if running >= self.settings.max_running_jobs:
                return
            lock = self._lock(rec.job.id)
            if lock.locked():
                continue
            async with lock:
                now_rec = self._record(rec.job.id)
                if now_rec.job.status != "queued":
                    continue
                await self._launch(now_rec)
                running += 1

    async def _launch(self, rec: JobRecord) -> None:
        """Start the job's next attempt. Called with the job's lock held. The attempt number
        is committed before the worker starts, so its first report passes the fence."""
        assert self._endpoints is not None
        job = rec.job
        attempt = job.attempt + 1
        fields: dict[str, Any] = {"attempt": attempt, "runner_ref": None}
        if job.started_at is None:
            fields["started_at"] = now()
        if job.status != "running":
            rec = await self._update(
                job.id,
                [("status", {"status": "running", "attempt": attempt})],
                status="running",
                **fields,
            )
        else:
            rec = await self._update(job.id, **fields)
        key = self.runtime.keyring.grant()
        self._keys[job.id] = key
        command = [
            sys.executable,
            "-m",
            "rewardserve.jobs.worker",
            "--job-id",
            job.id,
            "--attempt",
            str(attempt),
            "--rest",
            self._endpoints.rest_url,
            "--grpc",
            self._endpoints.grpc_address,
        ]
        if rec.resume:
            command.append("--resume")
        threads = str(threads_for(job.resources, self.settings.job_torch_threads))
        launch = Launch(
            job_id=job.id,
            attempt=attempt,
            command=command,
            env={
                "REWARDSERVE_WORKER_API_KEY": key,
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
                "OMP_WAIT_POLICY": "PASSIVE",
                "PYTHONPATH": worker_pythonpath(os.environ.get("PYTHONPATH")),
            },
            resources=job.resources,
            log_path=self.log_path(job.id),
        )
        self.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        try:
            ref = await self.runner.launch(launch)
        except Exception as e:
            why = e.message if isinstance(e, ServiceError) else f"{type(e).__name__}: {e}"
            log.error("job %s: could not start its worker: %s", job.id, why)
            await self._finish(rec, "failed", error=f"could not start the worker: {why}")
            return
        await self._update(job.id, runner_ref=ref)
        log.info(
            "job %s: attempt %d started (%s)%s",
            job.id,
            attempt,
            ref,
            " resuming" if rec.resume else "",
        )
