"""What every operation of the OpenAPI document shares, added in one place: the `X-Request-ID`
header on every response, and on every authenticated route the rate-limit headers, the 429 of
its limits and the 403 of a key whose scope does not reach it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.auth import EMBED_ROUTES
from app.errors import InsufficientScope, TooManyRequests

ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}

HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-ID": {
        "description": "The request's id: the client's own when it sent a valid one (1-128 "
        "letters, digits and `-_.:`), else a generated `req_...`. Also in every error body "
        "and in the service's logs.",
        "schema": {"type": "string"},
        "required": True,
    },
    "X-RateLimit-Limit": {
        "description": "Requests this key may make at once (its bucket's size).",
        "schema": {"type": "integer"},
    },
    "X-RateLimit-Remaining": {
        "description": "Requests left in the key's bucket now.",
        "schema": {"type": "integer"},
    },
    "X-RateLimit-Reset": {
        "description": "Seconds until the key's bucket is full again.",
        "schema": {"type": "integer"},
    },
    "Retry-After": {
        "description": "Seconds to wait before the request can succeed.",
        "schema": {"type": "integer"},
    },
}
RATE_LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


def _authenticated(operation: dict[str, Any]) -> bool:
    return "401" in operation.get("responses", {})


def _complete(path: str, operation: dict[str, Any]) -> None:
    responses = operation.setdefault("responses", {})
    if _authenticated(operation):
        # The route's own error shape (OpenAI's on the OpenAI-compatible route).
        error_body = responses["401"].get("content", ERROR_BODY)
        if path not in EMBED_ROUTES and "403" not in responses:
            responses["403"] = {"description": InsufficientScope.description,
                                "content": error_body}
        responses["429"] = {
            "description": TooManyRequests.description,
            "content": error_body,
            "headers": {name: _ref(name) for name in ("Retry-After", *RATE_LIMIT_HEADERS)},
        }
        responses = dict(sorted(responses.items()))
        operation["responses"] = responses
    for status, response in responses.items():
        headers = response.setdefault("headers", {})
        headers["X-Request-ID"] = _ref("X-Request-ID")
        if _authenticated(operation) and status.startswith("2"):
            headers.update({name: _ref(name) for name in RATE_LIMIT_HEADERS})


def document_common_responses(app: FastAPI) -> None:
    """Make `app.openapi()` carry the shared headers and responses."""

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    _complete(path, operation)
            schema.setdefault("components", {})["headers"] = HEADERS
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
