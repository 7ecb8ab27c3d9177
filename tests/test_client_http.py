"""The Python client on its own: its HTTP behaviour against a real local HTTP server that
answers from a script (retries with backoff, Retry-After, one Idempotency-Key across a job's
retries, no resending of uploads the server may have acted on, errors carrying code and
detail), safe unpacking of model archives, and a package that needs nothing of the server."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import requires
from pathlib import Path

import pytest
from tailor_client import (
    APIConnectionError,
    ArchiveError,
    Client,
    NotFoundError,
    RateLimitError,
    ServerError,
)
from tailor_client.download import unpacked_into
from tailor_client.transport import retry_after_seconds


@dataclass
class Answer:
    status: int
    body: object = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    at: float


class ScriptedServer:
    """Answers each request with the next scripted answer (the last one repeats)."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = answers
        self.seen: list[Seen] = []
        script = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                script.seen.append(Seen(self.command, self.path, dict(self.headers),
                                        time.monotonic()))
                answer = script.answers[min(len(script.seen), len(script.answers)) - 1]
                raw = answer.body if isinstance(answer.body, bytes) else \
                    json.dumps(answer.body).encode()
                self.send_response(answer.status)
                for name, value in {"Content-Type": "application/json", **answer.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def client_for() -> Iterator:
    opened: list[Client] = []

    def make(server: ScriptedServer, **options: object) -> Client:
        client = Client(server.url, api_key="tlr_test", backoff_s=0.01, **options)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


EMPTY_PAGE = Answer(200, {"data": [], "count": 0})
JOB = {"id": "job_1", "status": "queued"}


def error(code: str, detail: str, **context: object) -> dict[str, object]:
    return {"error": code, "detail": detail, **context}


def test_a_429_is_retried_after_the_seconds_retry_after_names(client_for) -> None:
    busy = Answer(429, error("rate_limited", "slow down"), {"Retry-After": "1"})
    with ScriptedServer([busy, EMPTY_PAGE]) as server:
        page = client_for(server).corpora.list()
    assert page == {"data": [], "count": 0}
    first, second = server.seen
    # The client waited as told, not its own (10 ms) backoff.
    assert second.at - first.at >= 0.95


def test_retry_after_as_an_http_date() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=30), usegmt=True),
                               now) == 30.0
    assert retry_after_seconds("2.5") == 2.5
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_a_longer_retry_after_than_the_caller_accepts_raises_at_once(client_for) -> None:
    busy = Answer(429, error("rate_limited", "come back in an hour"), {"Retry-After": "3600"})
    with ScriptedServer([busy, EMPTY_PAGE]) as server:
        with pytest.raises(RateLimitError) as raised:
            client_for(server, max_retry_after_s=5).corpora.list()
    assert len(server.seen) == 1
    assert raised.value.code == "rate_limited" and raised.value.headers["Retry-After"] == "3600"


def test_server_errors_are_retried_with_backoff_until_the_retries_are_spent(client_for) -> None:
    broken = Answer(503, error("unavailable", "object store down"))
    with ScriptedServer([broken]) as server:
        with pytest.raises(ServerError) as raised:
            client_for(server, max_retries=2).jobs.get("job_1")
    assert len(server.seen) == 3
    assert (raised.value.status_code, raised.value.code) == (503, "unavailable")
    assert raised.value.detail == "object store down"


def test_a_job_keeps_one_idempotency_key_across_its_retries(client_for) -> None:
    with ScriptedServer([Answer(502, b"<html>bad gateway</html>"), Answer(201, JOB),
                         Answer(201, JOB)]) as server:
        client = client_for(server)
        assert client.jobs.create("crp_1", preset="quick")["id"] == "job_1"
        client.jobs.create("crp_1", preset="quick")
    keys = [seen.headers.get("Idempotency-Key") for seen in server.seen]
    assert keys[0] and keys[0] == keys[1]  # the retry: the same key
    assert keys[2] and keys[2] != keys[0]  # another create() call: a new job, a new key


def test_an_upload_is_not_sent_again_after_an_error_the_server_may_have_acted_on(
    client_for, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "d1", "text": "a document"}\n')
    with ScriptedServer([Answer(500, error("internal_error", "internal server error"))]) as server:
        with pytest.raises(ServerError):
            client_for(server).corpora.upload(corpus)
    assert len(server.seen) == 1
    # 503 says nothing was done: sent again, the file read again from its start.
    created = {"id": "crp_1", "documents": 1}
    with ScriptedServer([Answer(503, error("unavailable", "try later")),
                         Answer(201, created)]) as server:
        progress: list[tuple[int, int | None]] = []
        assert client_for(server).corpora.upload(
            corpus, on_progress=lambda done, total: progress.append((done, total))
        ) == created
    assert len(server.seen) == 2
    size = corpus.stat().st_size
    assert progress[-1] == (size, size) and {total for _, total in progress} == {size}
    assert server.seen[0].headers["Content-Length"] == server.seen[1].headers["Content-Length"]


def test_errors_carry_the_apis_code_detail_and_context(client_for) -> None:
    missing = error("not_found", "job job_9 not found", resource="job", id="job_9")
    with ScriptedServer([Answer(404, missing)]) as server:
        with pytest.raises(NotFoundError) as raised:
            client_for(server).jobs.get("job_9")
    assert raised.value.code == "not_found" and raised.value.detail == "job job_9 not found"
    assert raised.value.context == {"resource": "job", "id": "job_9"}
    assert len(server.seen) == 1  # a 404 is an answer, not a failure to retry
    with ScriptedServer([Answer(502, b"<html>bad gateway</html>")]) as server:
        with pytest.raises(ServerError) as raised:
            client_for(server, max_retries=0).jobs.get("job_9")
    assert raised.value.code == "http_502" and "bad gateway" in raised.value.detail


def test_an_unreachable_api_raises_a_connection_error_after_retrying(tmp_path: Path) -> None:
    with ScriptedServer([EMPTY_PAGE]) as server:
        url = server.url  # closed on leaving: nothing listens there any more
    sleeps: list[float] = []
    with Client(url, api_key="k", max_retries=3, sleep=sleeps.append) as client:
        with pytest.raises(APIConnectionError):
            client.corpora.list()
    assert len(sleeps) == 3 and sleeps == sorted(sleeps)  # backoff grows


def _archive(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_model_archive_unpacks_as_the_folder_itself(tmp_path: Path) -> None:
    target = tmp_path / "retriever"
    with unpacked_into(target) as archive:
        archive.write_bytes(_archive({"mdl_1/modules.json": b"[]", "mdl_1/1_Pooling/c": b"{}"}))
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "1_Pooling", "1_Pooling/c", "modules.json"]
    with pytest.raises(FileExistsError):  # never mixed into a folder that holds files
        with unpacked_into(target):
            pass


def test_an_archive_that_escapes_its_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError):
        with unpacked_into(tmp_path / "model") as archive:
            archive.write_bytes(_archive({"../outside.txt": b"x"}))
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "model").exists()


def test_the_package_depends_on_httpx_and_rich_only_and_imports_nothing_of_the_server() -> None:
    assert sorted(r.split(">")[0].split("=")[0] for r in requires("tailor-client") or []) == [
        "httpx", "rich"]
    probe = ("import sys, tailor_client, tailor_client.cli; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'app', 'worker', 'ml_core', 'torch', 'pydantic', 'fastapi'}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, cwd="/")
    assert done.stdout.strip() == "[]"


def test_one_request_id_across_a_calls_retries_and_errors_quote_it(client_for) -> None:
    with ScriptedServer([Answer(503, error("unavailable", "busy")), EMPTY_PAGE,
                         EMPTY_PAGE]) as server:
        client = client_for(server)
        client.corpora.list()
        client.corpora.list()
    ids = [seen.headers.get("X-Request-ID") for seen in server.seen]
    assert ids[0] and ids[0] == ids[1] and ids[2] != ids[0]  # a retry vs another call
    # The body's request_id when the API answers; the header when a proxy did.
    missing = error("not_found", "no such job", request_id="req_from_body")
    with ScriptedServer([Answer(404, missing)]) as server:
        with pytest.raises(NotFoundError) as raised:
            client_for(server).jobs.get("job_9")
    assert raised.value.request_id == "req_from_body"
    with ScriptedServer([Answer(502, b"bad gateway", {"X-Request-ID": "req_header"})]) as server:
        with pytest.raises(ServerError) as raised:
            client_for(server, max_retries=0).jobs.get("job_9")
    assert raised.value.request_id == "req_header"


@pytest.mark.parametrize("create", [
    lambda client: client.embedding_jobs.create("tiny-student", "crp_1"),
    lambda client: client.api_keys.create("search", scope="embed"),
])
def test_creates_without_server_side_idempotency_are_not_sent_twice(client_for, create) -> None:
    """Bulk embedding jobs and API keys take no Idempotency-Key: a create the server may have
    acted on (500, 502) is not sent again; one it cannot have acted on (503) is."""
    with ScriptedServer([Answer(502, b"<html>bad gateway</html>")]) as server:
        with pytest.raises(ServerError):
            create(client_for(server))
    assert len(server.seen) == 1
    with ScriptedServer([Answer(503, error("unavailable", "try later")),
                         Answer(201, {"id": "x_1"})]) as server:
        assert create(client_for(server)) == {"id": "x_1"}
    assert len(server.seen) == 2


def test_verify_accepts_what_standard_webhooks_signs_and_refuses_the_rest() -> None:
    from standardwebhooks.webhooks import Webhook as Reference  # what the workers sign with
    from tailor_client.webhooks import WebhookVerificationError, sign, verify

    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    body = json.dumps({"type": "job.succeeded", "timestamp": "2026-01-01T00:00:00Z",
                       "data": {"id": "job_1"}}, separators=(",", ":")).encode()
    at = datetime.now(UTC)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(at.timestamp())),
               "webhook-signature": Reference(secret).sign("msg_1", at, body)}
    assert headers["webhook-signature"] == sign(secret, "msg_1", int(at.timestamp()), body)
    assert verify(secret, body, {k.title(): v for k, v in headers.items()})["data"] == \
        {"id": "job_1"}
    # A rotated secret: several signatures, one of them good.
    rotated = {**headers, "webhook-signature": "v1,bm9wZQ== " + headers["webhook-signature"]}
    assert verify(secret, body, rotated)["type"] == "job.succeeded"
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    for case, call in {
        "no webhook-signature matches": lambda: verify(secret, body + b" ", headers),
        "no webhook-signature matches ": lambda: verify(other, body, headers),
        "too old": lambda: verify(secret, body, headers, now=at.timestamp() + 301),
        "missing header webhook-id": lambda: verify(
            secret, body, {k: v for k, v in headers.items() if k != "webhook-id"}),
    }.items():
        with pytest.raises(WebhookVerificationError, match=case.strip()):
            call()
    Reference(secret).verify(body, headers)  # and the reference agrees the original is good
