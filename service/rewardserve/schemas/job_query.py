"""The jobs listing's filters, checked the same way for GET /v1/jobs and gRPC ListJobs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import get_args

from pydantic import BaseModel, Field, ValidationError

from rewardserve.schemas.errors import InvalidArgument, from_validation_error
from rewardserve.schemas.jobs import JobStatus, JobType

DEFAULT_LIMIT, MAX_LIMIT = 50, 500
STATUSES: tuple[str, ...] = get_args(JobStatus)


class ListQuery(BaseModel):
    status: list[JobStatus] | None = None
    type: JobType | None = None
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    page_token: str | None = None


def statuses(values: Iterable[str] | None) -> list[str] | None:
    """Repeated and/or comma-separated statuses, deduplicated in order; None: no filter.
    An entry that is not a status is an InvalidArgument naming `status`."""
    out: list[str] = []
    for value in values or ():
        for part in value.split(","):
            s = part.strip()
            if not s:
                continue
            if s not in STATUSES:
                raise InvalidArgument(
                    f"'{s[:64]}' is not a job status (one of {', '.join(STATUSES)})",
                    field="status",
                )
            if s not in out:
                out.append(s)
    return out or None


def list_query(
    status: Iterable[str] | None, type: str | None, limit: int | None, page_token: str | None
) -> ListQuery:
    """The filters as given (None or empty: unset), validated (Unprocessable naming the field)."""
    raw = {
        "status": statuses(status),
        "type": type or None,
        "limit": limit or DEFAULT_LIMIT,
        "page_token": page_token or None,
    }
    try:
        return ListQuery.model_validate(raw)
    except ValidationError as e:
        raise from_validation_error(e) from None
