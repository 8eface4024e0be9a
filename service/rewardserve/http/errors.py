"""Every failure as the one JSON error shape; never a bare 500 for bad input."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from rewardserve.schemas.errors import (
    ErrorBody,
    InvalidArgument,
    NotFound,
    Overloaded,
    ServiceError,
    from_validation_errors,
)

log = logging.getLogger(__name__)

# What any route taking a JSON body may answer before its handler runs: a body that does not
# parse or validate, the body guard (413, 415) and auth (401, 403).
BODY_ERRORS = (400, 401, 403, 413, 415, 422)
# What scoring adds: an unknown model, a full queue, a model not loaded, a deadline.
SCORING_ERRORS = (*BODY_ERRORS, 404, 429, 503, 504)


def documented(*statuses: int) -> dict[int | str, dict]:
    """A route's `responses=`: each status it may answer, with the one error shape, so
    /openapi.json lists every status the route really returns (checked by schemathesis)."""
    return {s: {"model": ErrorBody} for s in statuses}


def error_response(err: ServiceError) -> JSONResponse:
    headers = {}
    if isinstance(err, Overloaded):
        headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
    return JSONResponse(err.body().model_dump(), status_code=err.http_status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_: Request, err: ServiceError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        errors = list(err.errors())
        if errors and errors[0].get("type") == "json_invalid":
            return error_response(InvalidArgument("request body is not valid JSON", field="body"))
        if errors and errors[0].get("type") == "missing" and tuple(errors[0]["loc"]) == ("body",):
            return error_response(InvalidArgument("request body is missing", field="body"))
        return error_response(from_validation_errors(errors))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 404:
            return error_response(NotFound("no such route"))
        if err.status_code == 400:  # the body could not be parsed (e.g. not UTF-8)
            return error_response(InvalidArgument(f"bad request body: {err.detail}", field="body"))
        body = {"error": {"code": "http_error", "message": str(err.detail), "field": None}}
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(ServiceError(f"internal error: {type(err).__name__}"))
