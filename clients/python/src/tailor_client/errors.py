"""Exceptions: every API error carries the API's own code, detail and context.

The API answers every error with one JSON shape, `{"error": code, "detail": message,
"request_id": id, ...context}` (context such as `field` and `line` for an invalid upload).
`APIError.from_response` turns it into the subclass for its HTTP status, so callers can catch
broadly (`APIError`) or narrowly (`NotFoundError`), and branch on `code` (e.g.
"invalid_corpus", "idempotency_conflict").
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx


class TailorError(Exception):
    """Base of every exception this package raises."""


class APIConnectionError(TailorError):
    """The API could not be reached (or did not answer) even after the retries."""


class APIError(TailorError):
    """The API answered with an error status."""

    status_codes: ClassVar[tuple[int, ...]] = ()

    def __init__(
        self,
        status_code: int,
        code: str,
        detail: str,
        context: dict[str, Any] | None = None,
        headers: httpx.Headers | None = None,
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.status_code = status_code
        self.code = code
        self.detail = detail
        self.context = dict(context or {})
        self.headers = headers if headers is not None else httpx.Headers()

    @property
    def request_id(self) -> str | None:
        """The request's id, to quote when reporting a problem: the body's `request_id`, or
        the `X-Request-ID` header when the body is not the API's (a proxy's page)."""
        value = self.context.get("request_id") or self.headers.get("X-Request-ID")
        return str(value) if value else None

    @property
    def field(self) -> str | None:
        """The request or file field the API names as wrong, when it names one."""
        value = self.context.get("field")
        return str(value) if value is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status_code}, {self.code!r}, {self.detail!r})"

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIError:
        """The exception for an error response; a body that is not the API's JSON shape (a
        proxy's HTML page, say) still gives a code ("http_<status>") and a detail."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            code = body["error"]
            detail = str(body.get("detail", ""))
            context = {k: v for k, v in body.items() if k not in ("error", "detail")}
        else:
            code = f"http_{response.status_code}"
            detail = response.text.strip()[:500] or response.reason_phrase
            context = {}
        error_class = _class_for(response.status_code)
        return error_class(response.status_code, code, detail, context, response.headers)


class AuthenticationError(APIError):
    """401: missing, malformed, unknown or revoked API key."""

    status_codes = (401,)


class PermissionDeniedError(APIError):
    """403: the key may not do this."""

    status_codes = (403,)


class NotFoundError(APIError):
    """404: no such resource for this tenant."""

    status_codes = (404,)


class ConflictError(APIError):
    """409: the resource's state does not allow this (`code` says which conflict)."""

    status_codes = (409,)


class PayloadTooLargeError(APIError):
    """413: the upload is larger than the server's limit."""

    status_codes = (413,)


class InvalidRequestError(APIError):
    """422: the request or an uploaded file is invalid; `field` (and `line`) say where."""

    status_codes = (400, 422)


class RateLimitError(APIError):
    """429: too many requests (raised once the retries are spent)."""

    status_codes = (429,)


class ServerError(APIError):
    """5xx: the server or a service behind it failed."""


def _class_for(status_code: int) -> type[APIError]:
    for error_class in (
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        ConflictError,
        PayloadTooLargeError,
        InvalidRequestError,
        RateLimitError,
    ):
        if status_code in error_class.status_codes:
            return error_class
    return ServerError if status_code >= 500 else APIError
