"""An in-memory stand-in for rewardserve.jobs.manager.JobManager, for the transports' unit
tests (tests/unit/test_jobs_http.py, test_jobs_grpc.py).

It has the manager's interface (COMMON.md) and none of its work: no store, no workers, no
validation beyond JobCreate. The test drives it: `emit` appends an event (live streams see it
at once), `set_status` flips a job and emits the status event. The real manager is tested
on its own; the end-to-end jobs tests run the transports over it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from rewardserve.auth import KeyRing
from rewardserve.schemas.errors import Conflict, InvalidArgument, NotFound
from rewardserve.schemas.jobs import TERMINAL, Job, JobCreate, JobEvent, JobList, WorkerReport

SCORE_KEY, ADMIN_KEY = "score-key-0123456789", "admin-key-0123456789"


def keyring() -> KeyRing:
    return KeyRing.from_entries([f"{SCORE_KEY}:score", f"{ADMIN_KEY}:admin"])


def fake_runtime(jobs: FakeJobManager | None, keys: KeyRing | None = None) -> SimpleNamespace:
    """What the transports read off a Runtime: the keyring and `jobs` (gRPC's server also
    wires the scoring and Best-of-N servicers, which these tests never call)."""
    return SimpleNamespace(
        keyring=keys or keyring(),
        jobs=jobs,
        scoring=SimpleNamespace(readiness_listeners=[]),
        bon=None,
    )


class FakeJobManager:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.bodies: dict[str, JobCreate] = {}
        self.events_of: dict[str, list[JobEvent]] = {}
        self.metrics_of: dict[str, list[dict[str, Any]]] = {}
        self.logs_of: dict[str, str] = {}
        self.reports: list[tuple[str, WorkerReport]] = []
        self.list_calls: list[dict[str, Any]] = []
        self.open_streams = 0
        """events() iterators started and not yet closed: a leak shows here."""
        self._next_event = 0
        self._changed = asyncio.Event()
        self.readiness_listeners: list[Any] = []
        self.ready, self.failure = True, None

    # ---- the interface ----------------------------------------------------------------
    async def create(self, req: JobCreate) -> tuple[Job, bool]:
        if req.idempotency_key is not None:
            for job_id, body in self.bodies.items():
                if body.idempotency_key == req.idempotency_key:
                    if body != req:
                        raise Conflict(
                            "this idempotency_key was used with another body",
                            field="idempotency_key",
                        )
                    return self.jobs[job_id], False
        job = Job(
            id="job-" + uuid.uuid4().hex[:12],
            type=req.type,
            status="queued",
            created_at=datetime.now(UTC),
            config={"total_steps": 3, **req.config},
            resources=req.resources,
            total_steps=req.config.get("total_steps", 3),
            idempotency_key=req.idempotency_key,
        )
        self.jobs[job.id], self.bodies[job.id] = job, req
        self.events_of[job.id], self.metrics_of[job.id] = [], []
        self.logs_of[job.id] = ""
        self.emit(job.id, "status", {"status": "queued"})
        return job, True

    async def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise NotFound(f"no job '{job_id}'", field="id")
        return self.jobs[job_id]

    async def list(
        self, *, status: list[str] | None, type: str | None, limit: int = 50, page_token: str | None
    ) -> JobList:
        self.list_calls.append(
            {"status": status, "type": type, "limit": limit, "page_token": page_token}
        )
        matching = [
            j
            for j in reversed(self.jobs.values())
            if (status is None or j.status in status) and (type is None or j.type == type)
        ]
        try:
            start = int(page_token or 0)
        except ValueError:
            raise InvalidArgument("not a page token", field="page_token") from None
        end = start + limit
        token = str(end) if end < len(matching) else None
        return JobList(data=matching[start:end], next_page_token=token)

    async def cancel(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job.status in TERMINAL:
            raise Conflict(f"job '{job_id}' has already ended ({job.status})", field="id")
        return self.set_status(job_id, "cancelled")

    async def resume(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job.status not in ("cancelled", "failed"):
            raise Conflict(f"job '{job_id}' is {job.status}: nothing to resume", field="id")
        return self.set_status(job_id, "queued", attempt=job.attempt + 1)

    async def metrics(self, job_id: str) -> list[dict[str, Any]]:
        await self.get(job_id)
        return self.metrics_of[job_id]

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
        await self.get(job_id)
        self.open_streams += 1
        try:
            while True:
                changed = self._changed
                for event in [e for e in self.events_of[job_id] if e.id > after]:
                    yield event
                    after = event.id
                    if event.type == "status" and event.data["status"] in TERMINAL:
                        return
                if self.jobs[job_id].status in TERMINAL:
                    return  # resumed past the terminal event: nothing more will come
                await changed.wait()
        finally:
            self.open_streams -= 1

    async def logs(self, job_id: str, tail_bytes: int | None = None) -> str:
        await self.get(job_id)
        text = self.logs_of[job_id]
        if tail_bytes is None:
            return text
        return text.encode()[-tail_bytes:].decode(errors="replace")

    async def report(self, job_id: str, report: WorkerReport) -> None:
        job = await self.get(job_id)
        if job.status in TERMINAL or report.attempt != job.attempt:
            raise Conflict("this report's attempt is not the job's current one", field="attempt")
        self.reports.append((job_id, report))

    # ---- driving it -------------------------------------------------------------------
    def emit(self, job_id: str, type: str, data: dict[str, Any]) -> JobEvent:
        self._next_event += 1
        event = JobEvent(
            id=self._next_event, job_id=job_id, type=type, created_at=datetime.now(UTC), data=data
        )
        self.events_of[job_id].append(event)
        # Wake every waiting stream: each waits on the Event it saw before reading.
        self._changed.set()
        self._changed = asyncio.Event()
        return event

    def step(self, job_id: str, step: int, metrics: dict[str, Any]) -> JobEvent:
        row = {"step": step, **metrics}
        self.metrics_of[job_id].append(row)
        self.jobs[job_id] = self.jobs[job_id].model_copy(update={"step": step, "metrics": row})
        samples = [{"prompt": "p", "response": "r", "reward": 0.5}]
        return self.emit(job_id, "step", {"step": step, "metrics": row, "samples": samples})

    def set_status(self, job_id: str, status: str, **update: Any) -> Job:
        job = self.jobs[job_id].model_copy(update={"status": status, **update})
        self.jobs[job_id] = job
        self.emit(job_id, "status", {"status": status})
        return job
