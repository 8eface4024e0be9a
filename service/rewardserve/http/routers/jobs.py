"""/v1/jobs: submit, list, watch, cancel and resume training jobs (admin scope).

Each handler turns the wire format into one JobManager call and its answer back; the
manager (rewardserve.jobs.manager) owns validation beyond the schemas, state and workers.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal, get_args

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from rewardserve.http.auth import require
from rewardserve.http.deps import jobs
from rewardserve.http.errors import BODY_ERRORS, documented
from rewardserve.jobs.plot import plot_png
from rewardserve.schemas.errors import InvalidArgument
from rewardserve.schemas.job_query import DEFAULT_LIMIT, MAX_LIMIT, STATUSES, list_query
from rewardserve.schemas.jobs import (
    EventType,
    Job,
    JobCreate,
    JobEvent,
    JobList,
    JobType,
    WorkerReport,
)

router = APIRouter(tags=["jobs"], dependencies=[Depends(require("admin"))])

REPLAYED_HEADER = "Idempotent-Replayed"
PING_S = 15.0
"""Seconds between SSE keep-alive comments, so proxies keep a quiet stream open."""

# Every job route may answer: auth (401, 403), jobs disabled (503), and with an id, 404.
# Parameters FastAPI checks (limit, type...) give 422; those the handler checks give 400.
COMMON = (400, 401, 403, 422, 503)
WITH_ID = (*COMMON, 404)


def _text(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}
    }


# Each server-sent event as OpenAPI describes a stream's items (schemathesis checks them).
SSE_EVENT = {
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"type": "string", "enum": list(get_args(EventType))},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": JobEvent.model_json_schema(),
        },
    },
}


class MetricsList(BaseModel):
    data: list[dict[str, Any]]
    """Every step's metrics, in step order (each has `step`)."""


@router.post(
    "/v1/jobs",
    status_code=201,
    response_model=Job,
    responses={
        200: {
            "model": Job,
            "description": f"An idempotent replay: the job first created with this "
            f"idempotency_key (header {REPLAYED_HEADER}: true)",
            "headers": {REPLAYED_HEADER: {"schema": {"type": "string", "enum": ["true"]}}},
        },
        **documented(*BODY_ERRORS, 404, 409, 503),
    },
)
async def create_job(body: JobCreate, request: Request, response: Response) -> Job:
    """Validate and queue a job (201). The same idempotency_key with the same body answers the
    first job (200, Idempotent-Replayed: true); with another body, 409."""
    job, created = await jobs(request).create(body)
    if not created:
        response.status_code = 200
        response.headers[REPLAYED_HEADER] = "true"
    return job


@router.get("/v1/jobs", response_model=JobList, responses=documented(*COMMON))
async def list_jobs(
    request: Request,
    status: list[str] | None = Query(
        None,
        description=f"Only jobs in these statuses ({', '.join(STATUSES)}): repeat the "
        "parameter or separate them with commas",
    ),
    type: JobType | None = Query(None, description="Only jobs of this type"),
    limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
    page_token: str | None = Query(None, description="next_page_token of the previous page"),
) -> JobList:
    """Jobs, newest first, a page at a time."""
    q = list_query(status, type, limit, page_token)
    return await jobs(request).list(
        status=q.status, type=q.type, limit=q.limit, page_token=q.page_token
    )


@router.get("/v1/jobs/{job_id}", response_model=Job, responses=documented(*WITH_ID))
async def get_job(job_id: str, request: Request) -> Job:
    """The job: status, step, latest metrics, checkpoints, result or error."""
    return await jobs(request).get(job_id)


def metrics_csv(rows: list[dict[str, Any]]) -> str:
    """One row per step; the columns are every key seen, in first-seen order, step first.
    Nested values are written as JSON, missing ones as empty cells."""
    columns: dict[str, None] = {"step": None}
    for row in rows:
        columns.update(dict.fromkeys(row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return out.getvalue()


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    return json.dumps(v) if isinstance(v, dict | list) else v


@router.get(
    "/v1/jobs/{job_id}/metrics",
    response_model=MetricsList,
    responses={
        200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
        **documented(*WITH_ID),
    },
)
async def job_metrics(
    job_id: str, request: Request, format: Literal["json", "csv"] = "json"
) -> Any:
    """Every step's metrics: JSON ({"data": [...]}) or, with format=csv, a CSV table."""
    rows = await jobs(request).metrics(job_id)
    if format == "csv":
        headers = {"Content-Disposition": f'inline; filename="{job_id}-metrics.csv"'}
        return Response(metrics_csv(rows), media_type="text/csv", headers=headers)
    return MetricsList(data=rows)


def last_event_id(header: str | None, after: int) -> int:
    """Where a stream resumes: a reconnecting client's Last-Event-ID header wins over ?after=
    (EventSource sends the header and keeps the URL it was opened with)."""
    if header is None or not header.strip():
        return after
    try:
        value = int(header.strip())
    except ValueError:
        raise InvalidArgument("Last-Event-ID must be an event id", field="last-event-id") from None
    if value < 0:
        raise InvalidArgument("Last-Event-ID must be an event id", field="last-event-id")
    return value


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=Response,
    responses={
        200: {
            "description": "Server-sent JobEvents",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
        **documented(*WITH_ID),
    },
)
async def job_events(
    job_id: str,
    request: Request,
    after: int = Query(0, ge=0, description="Only events with a larger id"),
    last_event_id_header: str | None = Header(None, alias="Last-Event-ID"),
) -> EventSourceResponse:
    """The job's events as Server-Sent Events (id: the event id, event: its type, data: the
    JobEvent as JSON): stored ones after the resume point, then live ones; the stream ends
    after the job's terminal status event. A comment line every 15 s keeps it open."""
    manager = jobs(request)
    start = last_event_id(last_event_id_header, after)
    await manager.get(job_id)  # 404 now, not a broken 200 stream

    async def stream() -> AsyncIterator[ServerSentEvent]:
        # aclosing: a disconnect cancels this generator, and that closes the manager's too.
        async with aclosing(manager.events(job_id, start)) as events:
            async for event in events:
                yield ServerSentEvent(
                    data=event.model_dump_json(), event=event.type, id=str(event.id)
                )

    return EventSourceResponse(stream(), ping=PING_S)


@router.get(
    "/v1/jobs/{job_id}/plot.png",
    response_class=Response,
    responses={**_text("image/png", "The job's curves"), **documented(*WITH_ID)},
)
async def job_plot(job_id: str, request: Request) -> Response:
    """Reward, KL, β, losses, entropy and response length over the steps (reward-model jobs:
    loss, accuracy, learning rate); before the first step, a picture saying so."""
    rows = await jobs(request).metrics(job_id)
    png = await asyncio.to_thread(plot_png, rows)  # rendering takes ~100 ms: not on the loop
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get(
    "/v1/jobs/{job_id}/logs",
    response_class=Response,  # not PlainTextResponse: errors stay documented as JSON
    responses={**_text("text/plain", "The worker's output"), **documented(*WITH_ID)},
)
async def job_logs(
    job_id: str,
    request: Request,
    tail_bytes: int | None = Query(None, ge=1, description="Only the last this many bytes"),
) -> PlainTextResponse:
    """The worker's stdout and stderr, every attempt appended."""
    return PlainTextResponse(await jobs(request).logs(job_id, tail_bytes))


@router.post("/v1/jobs/{job_id}/cancel", response_model=Job, responses=documented(*WITH_ID, 409))
async def cancel_job(job_id: str, request: Request) -> Job:
    """Stop a queued or running job; its checkpoints stay (resume continues). 409 if the job
    has already ended."""
    return await jobs(request).cancel(job_id)


@router.post("/v1/jobs/{job_id}/resume", response_model=Job, responses=documented(*WITH_ID, 409))
async def resume_job(job_id: str, request: Request) -> Job:
    """Queue a cancelled or failed job again, from its newest checkpoint; 409 otherwise."""
    return await jobs(request).resume(job_id)


@router.post(
    "/v1/jobs/{job_id}/report",
    status_code=204,
    response_class=Response,
    responses=documented(*BODY_ERRORS, 404, 409, 503),
)
async def report(job_id: str, body: WorkerReport, request: Request) -> Response:
    """A job worker's progress (started, step, checkpoint, succeeded, failed, log). 409: the
    report's attempt is not the job's current one (the worker is stale and exits)."""
    await jobs(request).report(job_id, body)
    return Response(status_code=204)
