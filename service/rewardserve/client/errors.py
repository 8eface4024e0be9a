"""One exception type per gRPC status, carrying what the server says about the failure.

The server puts the REST error shape into the status: the message is the status details and
the trailing metadata holds `error-code` (invalid_argument, overloaded, ...), `error-field`
(the dotted request field to blame, items.3.text) and, for an overloaded server,
`retry-after` (seconds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import grpc


class RewardServeError(Exception):
    """Base of every error the client raises for a failed call."""

    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        error_code: str | None = None,
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message if field is None else f"{message} (field: {field})")
        self.message = message
        self.field = field
        """The request field the server names (items.0.text), when one is to blame."""
        self.error_code = error_code
        """The server's machine-readable code (invalid_argument, overloaded, ...)."""
        self.retry_after = retry_after
        """Seconds the server asked the caller to wait before trying again, if it did."""
        self.attempts = attempts
        """How many times the call was tried before giving up."""

    @property
    def code(self) -> grpc.StatusCode:
        return self.status


class InvalidArgument(RewardServeError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RewardServeError):
    status = grpc.StatusCode.NOT_FOUND


class Unauthenticated(RewardServeError):
    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RewardServeError):
    status = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(RewardServeError):
    """Overloaded (with `retry_after`) or a request too large for the server's limits."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RewardServeError):
    status = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RewardServeError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(RewardServeError):
    status = grpc.StatusCode.CANCELLED


class FailedPrecondition(RewardServeError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class Internal(RewardServeError):
    status = grpc.StatusCode.INTERNAL


class Unimplemented(RewardServeError):
    status = grpc.StatusCode.UNIMPLEMENTED


_BY_STATUS: dict[grpc.StatusCode, type[RewardServeError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        FailedPrecondition,
        Internal,
        Unimplemented,
    )
}


def _metadata(pairs: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in pairs or ():
        out.setdefault(key, value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
    return out


def retry_after_of(metadata: dict[str, str]) -> float | None:
    """The server's retry-after in seconds, or None when absent or not a number."""
    raw = metadata.get("retry-after")
    if raw is None:
        return None
    with contextlib.suppress(ValueError):
        value = float(raw)
        if value >= 0:
            return value
    return None


def from_rpc_error(err: grpc.RpcError, attempts: int = 1) -> RewardServeError:
    """The typed exception for a failed call (sync or aio), with field and retry hint."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    meta = _metadata(err.initial_metadata() if hasattr(err, "initial_metadata") else None)
    # trailing metadata wins: that is where the server puts its error fields
    meta.update(_metadata(err.trailing_metadata() if hasattr(err, "trailing_metadata") else None))
    cls = _BY_STATUS.get(code, RewardServeError)
    exc = cls(
        details,
        field=meta.get("error-field"),
        error_code=meta.get("error-code"),
        retry_after=retry_after_of(meta),
        attempts=attempts,
    )
    if cls is RewardServeError:
        exc.status = code
    return exc
