"""Every request's id and closing log line, and the headers every response carries.

`X-Request-ID` is taken from the client when it is a plausible id (1-128 characters of letters,
digits and `-_.:`) and generated otherwise; it is returned on every response, put in every error
body (app.errors) and on every log line written while the request runs (app.logs). The request
line itself is logged when the response ends: method, route, status, duration, and the tenant,
key and resource ids that are known by then; never a header or a body.
"""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import bind, log_scope
from app.metrics import observe_request

log = logging.getLogger("app.requests")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def valid_request_id(value: str | None) -> str | None:
    """`value` when a client may name its request so, else None."""
    if value is not None and _VALID_REQUEST_ID.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    """A fresh request id (`req_` + 32 hex characters): 128 random bits from the process's
    generator (reseeded in every forked process), not os.urandom, whose system call per request
    showed under load; an id names a request, it guards nothing."""
    return f"req_{random.getrandbits(128):032x}"


def request_id_of(scope: Scope) -> str | None:
    """The id the middleware gave this request (None outside a request)."""
    return scope.get("state", {}).get("request_id")


def response_headers(scope: Scope) -> dict[str, str]:
    """The headers this request's response carries whatever it is: its id and, once the
    caller's key is known, its rate limit (set by app.deps in `state["rate_limit_headers"]`)."""
    state = scope.get("state", {})
    headers = {REQUEST_ID_HEADER: state.get("request_id", "")}
    headers.update(state.get("rate_limit_headers") or {})
    return headers


def _route_fields(scope: Scope) -> dict[str, Any]:
    route = scope.get("route")
    fields: dict[str, Any] = {"route": getattr(route, "path", None)}
    for name, value in (scope.get("path_params") or {}).items():
        if name.endswith("_id"):  # job_id, corpus_id...: ids, never text
            fields[name] = value
    return fields


class RequestContextMiddleware:
    """Pure ASGI (no body buffering): ids in, headers out, one log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = valid_request_id(given) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in response_headers(scope).items():
                    headers[name] = value
            await send(message)

        with log_scope(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_headers)
            except Exception:
                # Logged here, with the request's id, and answered in the one error shape;
                # Starlette's outer handler would answer without either.
                log.exception("unhandled error")
                if response_started:
                    raise
                body = {"error": "internal_error", "detail": "internal server error",
                        "request_id": request_id}
                await JSONResponse(body, status_code=500)(scope, receive, send_with_headers)
            finally:
                seconds = time.perf_counter() - started
                fields = _route_fields(scope)
                bind(**fields)
                observe_request(scope["method"], fields["route"], status, seconds)
                log.info(
                    "%s %s %s", scope["method"], scope["path"], status,
                    extra={"method": scope["method"], "status": status,
                           "duration_ms": round(seconds * 1000, 1)},
                )
