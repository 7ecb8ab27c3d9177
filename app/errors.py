"""One error hierarchy, one JSON shape: {"error": code, "detail": message, ...context}."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.request_context import request_id_of

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """Every error response: a stable machine-readable code, a message, and optional context
    (for example `line` and `field` for an invalid corpus, `checks` for readiness)."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="Stable error code, e.g. not_found, invalid_corpus.")
    detail: str = Field(description="Human-readable explanation.")
    request_id: str = Field(
        description="The request's id (its `X-Request-ID`): quote it when reporting a problem."
    )


class AppError(Exception):
    """Base of every error the API reports on purpose."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    description: ClassVar[str] = "Internal error."

    def __init__(
        self, detail: str, *, headers: Mapping[str, str] | None = None, **context: Any
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.context = context

    def body(self) -> dict[str, Any]:
        """The JSON body of the response."""
        return {"error": self.code, "detail": self.detail, **self.context}


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"
    description = "Missing, malformed, unknown or revoked API key."

    def __init__(self, detail: str = "a valid API key is required", **context: Any) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"}, **context)


class Forbidden(AppError):
    status_code = 403
    code = "forbidden"
    description = "The key may not do this (its scope), or a quota forbids it."


class InsufficientScope(Forbidden):
    code = "insufficient_scope"


class NotFound(AppError):
    status_code = 404
    code = "not_found"
    description = "No such resource for this tenant."


class Conflict(AppError):
    status_code = 409
    code = "conflict"
    description = "The resource's state does not allow this."


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"


class InvalidState(Conflict):
    code = "invalid_state"


class ResourceInUse(Conflict):
    code = "in_use"


class PayloadTooLarge(AppError):
    status_code = 413
    code = "payload_too_large"
    description = "The upload is larger than the configured limit."


class RangeNotSatisfiable(AppError):
    status_code = 416
    code = "range_not_satisfiable"
    description = "The Range header asks for bytes past the end (see `Content-Range`)."


class InvalidRequest(AppError):
    status_code = 422
    code = "validation_error"
    description = "The request or an uploaded file is invalid (see `error` and `field`)."


class InvalidCorpus(InvalidRequest):
    code = "invalid_corpus"


class InvalidEvalSet(InvalidRequest):
    code = "invalid_eval_set"


class InvalidQuerySet(InvalidRequest):
    code = "invalid_query_set"


class InvalidRecipe(InvalidRequest):
    code = "invalid_recipe"


class UnknownModel(InvalidRequest):
    code = "unknown_model"


class TooManyRequests(AppError):
    status_code = 429
    code = "rate_limited"
    description = (
        "Too many requests: a rate limit or a quota; wait `Retry-After` seconds when given."
    )


class QuotaExceeded(TooManyRequests):
    """A quota that frees up on its own (e.g. running jobs): 429; see app.quotas."""

    code = "quota_exceeded"


class StorageQuotaExceeded(Forbidden):
    """A quota that only the tenant's own deletions (or the operator) free: 403."""

    code = "quota_exceeded"


class InvalidModel(InvalidRequest):
    code = "invalid_model"
    description = "The uploaded model archive is refused (see `file`)."


class NotReady(AppError):
    status_code = 503
    code = "not_ready"
    description = "A dependency (database, broker, object store) is unavailable."


class Unavailable(AppError):
    status_code = 503
    code = "unavailable"
    description = "A backing service failed; retry later."


def responses(*errors: type[AppError]) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each error class's status documented with the ErrorBody shape."""
    documented: dict[int | str, dict[str, Any]] = {}
    for error in sorted(errors, key=lambda e: e.status_code):
        entry = documented.setdefault(
            error.status_code, {"model": ErrorBody, "description": error.description}
        )
        if error.description not in entry["description"]:
            entry["description"] += " " + error.description
    return documented


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(part) for part in loc]
    if parts and parts[0] in {"body", "query", "path", "header"}:
        parts = parts[1:]
    return ".".join(parts)


def _json(request: Request, body: dict[str, Any], status: int,
          headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = {**body, "request_id": request_id_of(request.scope)}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}) or None)


async def _app_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return _json(request, exc.body(), exc.status_code, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field_path(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"field": "", "message": "invalid request"}
    detail = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    body = {"error": InvalidRequest.code, "detail": detail, "field": first["field"]}
    return _json(request, {**body, "errors": errors}, 422)


# What FastAPI's JSON body parser raises besides JSONDecodeError (which it reports as a 422
# itself): bytes that are not UTF-8, nesting past the interpreter's recursion limit, an integer
# past Python's digit limit. Each is a body that is not usable JSON, so it is answered like
# malformed JSON, in the status every JSON route documents.
_UNPARSABLE_BODY = (UnicodeDecodeError, RecursionError, ValueError)


def _body_error(exc: StarletteHTTPException) -> str | None:
    cause = exc.__cause__
    if exc.status_code != 400 or not isinstance(cause, _UNPARSABLE_BODY):
        return None
    if isinstance(cause, UnicodeDecodeError):
        return "the JSON body is not valid UTF-8"
    if isinstance(cause, RecursionError):
        return "the JSON body is nested too deeply"
    if "integer string conversion" in str(cause):
        return "the JSON body holds an integer with too many digits"
    return "the JSON body cannot be read"


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    unparsable = _body_error(exc)
    if unparsable is not None:
        body = {"error": InvalidRequest.code, "detail": f"body: {unparsable}", "field": "body"}
        return _json(request, body, 422)
    try:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    except ValueError:
        code = "http_error"
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return _json(request, {"error": code, "detail": detail}, exc.status_code, exc.headers)


async def _database_data_error(request: Request, exc: Exception) -> JSONResponse:
    # PostgreSQL refuses NUL characters in text; any text field of any request can hold one.
    # Other data errors are faults of ours and stay 500s.
    if "NUL" not in str(exc):
        raise exc
    detail = "a text value in the request holds a NUL character (\\u0000), which is not allowed"
    return _json(request, {"error": InvalidRequest.code, "detail": detail}, 422)


async def _lone_surrogate(request: Request, exc: Exception) -> JSONResponse:
    # JSON's \ud800 escapes decode to lone surrogates, which no database driver (nor UTF-8) can
    # encode: any text field of any JSON body can hold one. Other encoding errors are ours.
    if not isinstance(exc, UnicodeEncodeError) or exc.reason != "surrogates not allowed":
        raise exc
    detail = ("a text value in the request holds a lone surrogate (an unpaired \\ud800-\\udfff "
              "escape), which is not text")
    return _json(request, {"error": InvalidRequest.code, "detail": detail}, 422)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _json(request, {"error": "internal_error", "detail": "internal server error"}, 500)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the one JSON shape."""
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DataError, _database_data_error)
    app.add_exception_handler(UnicodeEncodeError, _lone_surrogate)
    app.add_exception_handler(Exception, _unhandled)
