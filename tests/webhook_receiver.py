"""A real HTTP receiver for webhook tests: a threaded server in the test process that verifies
every request's Standard Webhooks signature with the `standardwebhooks` library (as a customer
would) and answers each path from a plan of status codes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.processes import free_port


@dataclass
class Received:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    answered: int

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """The server's state: secrets and plans per path, and everything received."""

    url: str
    secrets: dict[str, str] = field(default_factory=dict)
    # Status codes to answer per path, first first; 200 once a plan runs out.
    plans: dict[str, list[int]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def wait_for(self, path: str, predicate: Callable[[Received], bool], timeout: float,
                 describe: Callable[[], str] = lambda: "") -> Received:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for request in self.at(path):
                if predicate(request):
                    return request
            time.sleep(0.2)
        seen = [(r.payload.get("type"), r.answered) for r in self.at(path)]
        raise AssertionError(f"nothing matching at {path} within {timeout}s; got {seen}\n"
                             f"{describe()}")


@contextmanager
def webhook_receiver() -> Iterator[Receiver]:
    """Serve on a free loopback port until the block ends."""
    port = free_port()
    receiver = Receiver(url=f"http://127.0.0.1:{port}")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            secret = receiver.secrets.get(self.path)
            try:
                Webhook(secret).verify(body, headers) if secret else None
                verified = secret is not None
            except WebhookVerificationError:
                verified = False
            with receiver.lock:
                plan = receiver.plans.get(self.path) or []
                answer = plan.pop(0) if plan else 200
                if not verified:
                    answer = 401
                receiver.received.append(Received(self.path, headers, body, verified, answer))
            self.send_response(answer)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
