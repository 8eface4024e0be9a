"""JobService messages <-> the jobs schemas. Requests go through the same pydantic models as
REST (JobCreate, the list filters), so both transports refuse the same inputs with the same
field names; proto3's empty strings and zeros mean "not given"."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format

from rewardserve.grpc.convert import _as_dict, _validated
from rewardserve.grpc.decoding import Undecodable
from rewardserve.schemas.errors import InvalidArgument
from rewardserve.schemas.job_query import ListQuery, list_query
from rewardserve.schemas.jobs import Job, JobCreate, JobEvent, JobList
from rewardserve.v1 import jobs_pb2 as pb


def _integral(v: Any) -> Any:
    """Struct numbers are doubles: 10 arrives as 10.0. Whole numbers become ints again, as a
    REST client's JSON would carry them, so int fields (total_steps...) validate alike."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v)
    if isinstance(v, dict):
        return {k: _integral(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_integral(x) for x in v]
    return v


def create_request(msg: pb.CreateJobRequest | Undecodable) -> JobCreate:
    data = _as_dict(msg)  # unset strings and empty lists are left out: the REST defaults
    if "config" in data:
        data["config"] = _integral(data["config"])
    return _validated(JobCreate, data)


def job_id(msg: pb.GetJobRequest | pb.WatchJobRequest | Undecodable) -> str:
    if isinstance(msg, Undecodable):
        _as_dict(msg)  # raises
    if not msg.id:
        raise InvalidArgument("give the job's id", field="id")
    return msg.id


def list_request(msg: pb.ListJobsRequest | Undecodable) -> ListQuery:
    if isinstance(msg, Undecodable):
        _as_dict(msg)  # raises
    return list_query(list(msg.status), msg.type, msg.limit, msg.page_token)


def after_event_id(msg: pb.WatchJobRequest) -> int:
    if msg.after_event_id < 0:
        raise InvalidArgument("must be 0 or an event id", field="after_event_id")
    return msg.after_event_id


def rfc3339(dt: datetime | None) -> str:
    """Empty when unset; a naive time is taken as UTC (the store writes UTC)."""
    if dt is None:
        return ""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.isoformat().replace("+00:00", "Z")


def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def job(j: Job) -> pb.Job:
    data = j.model_dump(mode="json")
    for key in ("created_at", "started_at", "ended_at"):
        data[key] = rfc3339(getattr(j, key))
    data["resources"] = _without_none(data["resources"])
    return json_format.ParseDict(_without_none(data), pb.Job())


def job_list(page: JobList) -> pb.ListJobsResponse:
    return pb.ListJobsResponse(
        jobs=[job(j) for j in page.data], next_page_token=page.next_page_token or ""
    )


def job_event(e: JobEvent) -> pb.JobEvent:
    msg = pb.JobEvent(id=e.id, job_id=e.job_id, type=e.type, created_at=rfc3339(e.created_at))
    msg.data.update(e.model_dump(mode="json")["data"])
    return msg
