"""The one error shape of the service and the exceptions that produce it.

Each error knows its HTTP status and its gRPC status code (by name, so this module needs no
grpc import); both transports render the same code, message and field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError


class ErrorDetail(BaseModel):
    code: str
    """Machine-readable: invalid_argument, not_found, overloaded, ..."""
    message: str
    field: str | None = None
    """Dotted path of the offending request field (items.3.text), when one is to blame."""


class ErrorBody(BaseModel):
    error: ErrorDetail


class ServiceError(Exception):
    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field

    def body(self) -> ErrorBody:
        return ErrorBody(error=ErrorDetail(code=self.code, message=self.message, field=self.field))


class InvalidArgument(ServiceError):
    code, http_status, grpc_status = "invalid_argument", 400, "INVALID_ARGUMENT"


class Unprocessable(InvalidArgument):
    """Well-formed JSON whose fields are wrong (FastAPI's 422 convention)."""

    http_status = 422


class NotFound(ServiceError):
    code, http_status, grpc_status = "not_found", 404, "NOT_FOUND"


class Conflict(ServiceError):
    """The request clashes with the resource's state (cancel a finished job, an idempotency
    key reused with another body, a report from a worker that is no longer the job's)."""

    code, http_status, grpc_status = "conflict", 409, "FAILED_PRECONDITION"


class PayloadTooLarge(ServiceError):
    code, http_status, grpc_status = "payload_too_large", 413, "RESOURCE_EXHAUSTED"


class Overloaded(ServiceError):
    code, http_status, grpc_status = "overloaded", 429, "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(ServiceError):
    code, http_status, grpc_status = "unauthenticated", 401, "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code, http_status, grpc_status = "permission_denied", 403, "PERMISSION_DENIED"


class DeadlineExceeded(ServiceError):
    code, http_status, grpc_status = "deadline_exceeded", 504, "DEADLINE_EXCEEDED"


class Unavailable(ServiceError):
    code, http_status, grpc_status = "unavailable", 503, "UNAVAILABLE"


# Where FastAPI says a request parameter came from (the first part of its loc); a body's
# own fields may have the same names (compat's `query`), so only a leading one is dropped.
PARAM_SOURCES = ("query", "path", "header", "cookie")


def field_path(loc: Sequence[Any]) -> str:
    """('body', 'items', 3, 'text') -> 'items.3.text', ('query', 'limit') -> 'limit' (union
    branch names dropped)."""
    if loc and loc[0] in PARAM_SOURCES:
        loc = loc[1:]
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and "[" in p)]
    return ".".join(parts)


# Each branch of a union reports its own failure, tagged with the branch's type. Beside a
# structured branch (`StrictStr | PromptInput`'s PromptInput), the scalar one only says "not a
# string" (tagged 'str'): the structured branch's error names the real field.
SCALAR_BRANCHES = frozenset({"str", "int", "float", "bool", "bytes"})


def _scalar_branch_beside_another(err: dict[str, Any], errors: Sequence[dict[str, Any]]) -> bool:
    loc = tuple(err.get("loc", ()))
    for i, part in enumerate(loc):
        if part in SCALAR_BRANCHES and any(
            len(o_loc := tuple(o.get("loc", ()))) > i
            and o_loc[:i] == loc[:i]
            and o_loc[i] not in SCALAR_BRANCHES
            for o in errors
        ):
            return True
    return False


def from_validation_errors(errors: Sequence[dict[str, Any]]) -> Unprocessable:
    """The first pydantic error as an Unprocessable naming its field (a union's scalar branch
    skipped when another branch failed too)."""
    first = next((e for e in errors if not _scalar_branch_beside_another(e, errors)), errors[0])
    path = field_path(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    return Unprocessable(f"{path or 'body'}: {msg}", field=path or "body")


def from_validation_error(err: ValidationError) -> Unprocessable:
    return from_validation_errors(err.errors())
