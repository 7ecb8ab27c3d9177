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
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """Every error response: a stable machine-readable code, a message, and optional context
    (for example `line` and `field` for an invalid corpus, `checks` for readiness)."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="Stable error code, e.g. not_found, invalid_corpus.")
    detail: str = Field(description="Human-readable explanation.")


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


async def _app_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field_path(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"field": "", "message": "invalid request"}
    detail = f"{first['field']}: {first['message']}" if first["field"] else first["message"]
    body = {"error": InvalidRequest.code, "detail": detail, "field": first["field"]}
    return JSONResponse({**body, "errors": errors}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    try:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    except ValueError:
        code = "http_error"
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse(
        {"error": code, "detail": detail}, status_code=exc.status_code, headers=exc.headers
    )


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal_error", "detail": "internal server error"}, 500)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the one JSON shape."""
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
