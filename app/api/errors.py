"""Maps domain errors to HTTP statuses and renders every error as ``{"error": {code, message, details}}``.

A database error no route mapped itself (SQLAlchemy's, e.g. during an outage) is ``503 storage_unavailable``.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (
    ArtifactIntegrityError,
    DriftCheckNotFoundError,
    FeedbackConflictError,
    InvalidInputError,
    JobNotFoundError,
    ModelNotReadyError,
    ModelStoreError,
    PredictionNotFoundError,
    SentimentServiceError,
    StorageUnavailableError,
    UnsupportedMediaTypeError,
    VersionNotFoundError,
)
from app.retrain.alerts import UnauthorizedError, WebhookConfigurationError

log = structlog.get_logger(__name__)


STATUS_BY_ERROR: dict[type[SentimentServiceError], int] = {
    InvalidInputError: 422,
    UnsupportedMediaTypeError: 415,
    VersionNotFoundError: 404,
    PredictionNotFoundError: 404,
    JobNotFoundError: 404,
    DriftCheckNotFoundError: 404,
    UnauthorizedError: 401,
    WebhookConfigurationError: 500,
    FeedbackConflictError: 409,
    StorageUnavailableError: 503,
    ModelNotReadyError: 503,
    ArtifactIntegrityError: 500,
    ModelStoreError: 500,
}

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
}


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one shape of every error the API returns."""
    return JSONResponse(
        {"error": {"code": code, "message": message, "details": details}}, status_code=status, headers=headers
    )


def status_for(exc: SentimentServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SentimentServiceError)
    status = status_for(exc)
    if status >= 500:
        log.error("request_failed", code=exc.code, reason=exc.message)
    return error_response(status, exc.code, exc.message, exc.details)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A database call a route made failed (down, timed out, refused the statement): 503, as a route that maps it
    to :class:`StorageUnavailableError` itself answers. The message is fixed: the driver's names the SQL."""
    error = StorageUnavailableError("the database is unavailable; retry later")
    log.error("request_failed", code=error.code, reason=type(exc).__name__)
    return error_response(STATUS_BY_ERROR[StorageUnavailableError], error.code, error.message)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Keep where and why; drop "input" (it can be a 1 MiB text) and "ctx" (may hold exception objects).
    details = [
        {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        for err in exc.errors()
    ]
    malformed = any(d["type"] == "json_invalid" for d in details)
    message = "request body is not valid JSON" if malformed else "request body failed validation"
    return error_response(422, "malformed_json" if malformed else "validation_error", message, details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError | ValueError):
        # FastAPI's "There was an error parsing the body": JSON nested past the parser's recursion limit
        # (or text the JSON decoder refused); the documented answer to a body that is not JSON.
        return error_response(422, "malformed_json", "request body is not valid JSON")
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; unhandled exceptions are rendered by ``InternalErrorMiddleware``."""
    app.add_exception_handler(SentimentServiceError, _service_error)
    app.add_exception_handler(SQLAlchemyError, _database_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
