"""The embedding routes' shortcut: a well-formed request is answered without FastAPI's routing,
dependency resolution and body parsing.

A search application sends one query per request, and for such a request those layers cost the
event loop more than the request's own work (authorization, tokenizing, queueing, serialising);
the event loop shares the cores with the encoders, so what it spends there the encoders lose.
The shortcut takes POST /v1/embed and /v1/embeddings with `Content-Type: application/json` and a
`Content-Length`, parses the body with orjson (stricter than the json module, so it accepts no
body that FastAPI's parser would read differently), validates it with the route's own schema and
then runs the route's own code: the key check (`serving_tenant`), the handler, and the handlers
the app gives its errors. A response is therefore the same whichever way a request went. Any
other request (another content type, a chunked or large body, a body the schema refuses) goes
on to the app unchanged, its body replayed, and gets the app's own answer or error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.deps import bearer_key, registry_at, serving_tenant
from app.embeddings.openai_compat import app_handler_for, openai_error_response
from app.embeddings.router import create_embeddings, embed, openai_router, router
from app.embeddings.schemas import EmbedRequest, OpenAIEmbeddingRequest

# Larger bodies hold many inputs, whose encoding outweighs the layers skipped here.
SHORTCUT_MAX_BODY = 256 * 1024

Handler = Callable[..., Awaitable[Response]]
ErrorRenderer = Callable[[Request, Exception], Awaitable[Response]]


async def _app_error_response(request: Request, exc: Exception) -> Response:
    """What the app's ExceptionMiddleware answers `exc` with; re-raises what it leaves to the
    outer layers (an unexpected error: a 500 from app.request_context)."""
    handler = app_handler_for(request, exc, catch_all=False)
    if handler is None:
        raise exc
    return await handler(request, exc)


@dataclass(frozen=True)
class _Route:
    """One route the shortcut answers: its FastAPI route (for logs, metrics and the key's
    scope check), schema, handler, and how its errors are rendered."""

    route: APIRoute
    schema: type[BaseModel]
    handler: Handler
    errors: ErrorRenderer


def _routes() -> dict[str, _Route]:
    by_path = {r.path: r for r in (*router.routes, *openai_router.routes)
               if isinstance(r, APIRoute)}
    return {
        "/v1/embed": _Route(by_path["/v1/embed"], EmbedRequest, embed, _app_error_response),
        "/v1/embeddings": _Route(by_path["/v1/embeddings"], OpenAIEmbeddingRequest,
                                 create_embeddings, openai_error_response),
    }


def _json_length(scope: Scope) -> int | None:
    """The body's length when the request says it is JSON of a known length, else None."""
    content_type = length = None
    for name, value in scope["headers"]:
        if name == b"content-type" and content_type is None:
            content_type = value
        elif name == b"content-length" and length is None:
            length = value
    if content_type is None or content_type.lower() != b"application/json":
        return None
    if length is None or not length.isdigit():
        return None
    return int(length)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that first hands out the messages already read."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


class EmbeddingShortcut:
    """ASGI middleware (inside app.request_context's, so ids, headers, the log line and the
    metrics are the same): answers well-formed embedding requests itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.routes = _routes()
        self.answered = 0  # requests answered here (diagnostics, tests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        # With FastAPI's own telemetry on, its span names the route on the way through.
        if (route is None or scope["method"] != "POST" or scope.get("root_path")
                or "fastapi.telemetry" in scope):
            await self.app(scope, receive, send)
            return
        length = _json_length(scope)
        if length is None or length > SHORTCUT_MAX_BODY:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        chunks: list[bytes] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = self._validated(route, messages, chunks)
        if body is None:
            await self.app(scope, _replay(messages, receive), send)
            return
        self.answered += 1
        await self._answer(route, body, scope, receive, send)

    @staticmethod
    def _validated(route: _Route, messages: list[Message],
                   chunks: list[bytes]) -> BaseModel | None:
        if messages[-1]["type"] != "http.request":  # the client went away mid-body
            return None
        try:
            return route.schema.model_validate(orjson.loads(b"".join(chunks)))
        except (orjson.JSONDecodeError, ValidationError):
            return None

    async def _answer(self, route: _Route, body: BaseModel, scope: Scope, receive: Receive,
                      send: Send) -> None:
        # What the router sets on a match (the request's log line and metrics read the route).
        scope["route"], scope["endpoint"], scope["path_params"] = (
            route.route, route.route.endpoint, {})
        request = Request(scope, receive)
        try:
            settings = request.app.state.settings
            tenant = await serving_tenant(request, bearer_key(request))
            response = await route.handler(
                body, request, tenant, registry_at(settings.model_store),
                request.app.state.embedding_models, settings)
        except Exception as exc:
            response = await route.errors(request, exc)
        await response(scope, receive, send)

