"""HTTP with retries: exponential backoff with jitter on 429, 5xx and connection errors,
honouring the server's Retry-After.

Whether a failed request may be sent again depends on what it does. `Retry.SAFE` requests
(reads, deletes, embeddings, job creation under an Idempotency-Key) are retried on any
connection error and on 429/500/502/503/504. `Retry.UNSAFE` requests (uploads, which would
create a second copy) are retried only when the server cannot have acted on them: 429, 503, or
a connection that never opened.
"""

from __future__ import annotations

import email.utils
import enum
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx

from tailor_client.errors import APIConnectionError, APIError

USER_AGENT = "tailor-client/0.1.0"

# An upload factory opens its files inside the ExitStack it is given, so each attempt
# re-reads them from the start and every attempt closes them.
FilesFactory = Callable[[ExitStack], Mapping[str, Any]]


class Retry(enum.Enum):
    SAFE = "safe"
    UNSAFE = "unsafe"


RETRY_STATUSES = {Retry.SAFE: {429, 500, 502, 503, 504}, Retry.UNSAFE: {429, 503}}
# Raised before a single byte reached the server: safe to send again whatever the request.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None when
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class Transport:
    """One httpx.Client, the API key, and the retry policy."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_retry_after_s: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        http: httpx.Client | None = None,
    ) -> None:
        headers = {"User-Agent": USER_AGENT}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout)
        self.http.headers.update(headers)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.sleep = sleep

    def close(self) -> None:
        self.http.close()

    # -------------------------------------------------------------------------------------
    # Requests

    def request(
        self,
        method: str,
        path: str,
        *,
        retry: Retry = Retry.SAFE,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Mapping[str, Any] | None = None,
        files: FilesFactory | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request (again, as the policy allows); returns a 2xx/3xx response or raises
        APIError / APIConnectionError."""
        params = _drop_none(params)
        headers = {**_request_id(), **(headers or {})}
        for attempt in self._attempts(retry):
            with ExitStack() as opened:
                try:
                    response = self.http.request(
                        method,
                        path,
                        params=params,
                        json=json,
                        data=data,
                        files=files(opened) if files else None,
                        headers=headers,
                    )
                except httpx.TransportError as exc:
                    attempt.failed(exc)
                    continue
            if attempt.check(response):
                return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    @contextmanager
    def stream(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None
    ) -> Iterator[httpx.Response]:
        """A streamed response (downloads), following redirects; retried until the body starts.
        httpx drops the Authorization header when a redirect leaves the API's host (a
        presigned object-store URL needs none)."""
        request = self.http.build_request(method, path, params=_drop_none(params),
                                          headers=_request_id())
        for attempt in self._attempts(Retry.SAFE):
            try:
                response = self.http.send(request, stream=True, follow_redirects=True)
            except httpx.TransportError as exc:
                attempt.failed(exc)
                continue
            try:
                answered = attempt.check(response, read_body=True)
            except BaseException:
                response.close()
                raise
            if answered:
                break
            response.close()
        try:
            yield response
        finally:
            response.close()

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """`request`, returning the decoded JSON body (None for 204)."""
        response = self.request(method, path, **kwargs)
        return None if response.status_code == 204 or not response.content else response.json()

    # -------------------------------------------------------------------------------------
    # Retry bookkeeping

    def _attempts(self, retry: Retry) -> Iterator[_Attempt]:
        return (_Attempt(self, retry, n) for n in range(self.max_retries + 1))

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter (AWS architecture blog, 2015)."""
        ceiling = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return random.uniform(ceiling / 2, ceiling)


class _Attempt:
    """One try of a request: decides whether its outcome is final, and waits before the next."""

    def __init__(self, transport: Transport, retry: Retry, number: int) -> None:
        self.transport, self.retry, self.number = transport, retry, number

    @property
    def last(self) -> bool:
        return self.number >= self.transport.max_retries

    def failed(self, exc: httpx.TransportError) -> None:
        """A connection error: wait and let the loop go on, or raise when it may not."""
        may_retry = self.retry is Retry.SAFE or isinstance(exc, NOT_SENT)
        if self.last or not may_retry:
            raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc
        self.transport.sleep(self.transport.backoff(self.number))

    def check(self, response: httpx.Response, read_body: bool = False) -> bool:
        """True when `response` is the answer; raises APIError for a final error status; waits
        and returns False when the request is to be sent again."""
        if response.status_code < 400:
            return True
        if read_body:
            response.read()
        error = APIError.from_response(response)
        if self.last or response.status_code not in RETRY_STATUSES[self.retry]:
            raise error
        wait = retry_after_seconds(response.headers.get("Retry-After"))
        if wait is None:
            wait = self.transport.backoff(self.number)
        elif wait > self.transport.max_retry_after_s:
            raise error  # the server asks for longer than the caller is willing to block
        self.transport.sleep(wait)
        return False


def _request_id() -> dict[str, str]:
    """One X-Request-ID per call, the same on each of its retries: the server logs every try
    under it, and errors quote it."""
    return {"X-Request-ID": f"req_{uuid.uuid4().hex}"}


def _drop_none(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if params is None:
        return None
    return {k: v for k, v in params.items() if v is not None}
