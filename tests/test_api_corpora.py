"""Corpus upload, validation, listing and deletion."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.db.models import Job, JobStatus
from tests.api_support import Api, corpus_bytes, rows_refused, start_api

pytest_plugins = ["tests.api_fixtures"]


def test_upload_stores_a_validated_corpus(api: Api) -> None:
    caller = api.tenant()
    data = corpus_bytes(7)
    response = caller.upload_corpus(data, filename="docs.jsonl", name="Aero docs")
    assert response.status_code == 201, response.text
    corpus = response.json()
    assert corpus["id"].startswith("crp_") and len(corpus["id"]) == 28
    assert corpus["name"] == "Aero docs"
    assert corpus["filename"] == "docs.jsonl"
    assert corpus["documents"] == 7
    assert corpus["size_bytes"] == len(data)
    assert corpus["sha256"] == hashlib.sha256(data).hexdigest()
    stored = api.objects / f"corpora/{corpus['id']}/corpus.jsonl"
    assert stored.read_bytes() == data
    assert caller.get(f"/v1/corpora/{corpus['id']}").json() == corpus


def test_a_long_file_name_names_the_corpus_cut_to_fit(api: Api) -> None:
    # File names may be up to 255 characters; a name taken from one is cut to the column's 200
    # (PostgreSQL refuses a longer value: this was a 500 there).
    caller = api.tenant()
    filename = "a" * 240 + ".jsonl"
    response = caller.upload_corpus(corpus_bytes(2), filename=filename)
    assert response.status_code == 201, response.text
    assert (response.json()["filename"], response.json()["name"]) == (filename, filename[:200])
    refused = caller.upload_corpus(corpus_bytes(2), name="n" * 201)
    assert refused.status_code == 422
    assert refused.json()["field"] == "name"


@pytest.mark.parametrize("route", ["/v1/corpora", "/v1/eval-sets"])
def test_an_upload_holds_no_database_connection_while_its_body_streams(
    api: Api, route: str
) -> None:
    # Driven as the server drives the app (ASGI, the body in pieces), because the test
    # client hands the whole body over at once: while the upload is still arriving, none of
    # the pool's connections may be checked out for it.
    caller = api.tenant()
    corpus_id = caller.corpus(2)["id"] if route == "/v1/eval-sets" else ""
    boundary = uuid.uuid4().hex
    chunks = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"corpus_id\"\r\n\r\n"
              f"{corpus_id}\r\n".encode(), *_chunked_multipart(corpus_bytes(2), boundary)]
    headers = {**caller.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    engine = api.app.state.session_factory.kw["bind"]
    checked_out: list[int] = []

    def mid_body(pulled: int) -> None:  # the request has started and its body is not all here
        if 1 < pulled < len(chunks):
            checked_out.append(engine.pool.checkedout())

    status, body, _ = _asgi_post(api, route, headers, chunks, mid_body)
    # The eval set route refuses this body (it has no queries or qrels); the corpus stores it.
    assert status == (201 if route == "/v1/corpora" else 422), body
    assert checked_out and set(checked_out) == {0}


def test_gzip_corpus_is_kept_compressed(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    data = corpus_bytes(4, compress=True)
    corpus = caller.upload_corpus(data, filename="c.jsonl.gz").json()
    assert corpus["documents"] == 4
    assert corpus["name"] == "c.jsonl.gz"  # default name: the file name
    stored = sqlite_api.objects / f"corpora/{corpus['id']}/corpus.jsonl.gz"
    assert gzip.decompress(stored.read_bytes()) == gzip.decompress(data)


BAD_FILES = {
    "wrong_json": (b'{"_id": "a", "text": "fine"}\n{"_id": "b", "text": \n', 2, None),
    "missing_text": (b'{"_id": "a", "text": "fine"}\n{"_id": "b", "title": "t"}\n', 2, "text"),
    "duplicate_ids": (b'{"_id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n'
                      b'{"_id": "a", "text": "z"}\n', 3, "_id"),
    "empty_file": (b"", None, None),
    "not_utf8": (b'{"_id": "a", "text": "\xff\xfe"}\n', 1, None),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_invalid_corpus_is_refused_with_its_line_and_field(sqlite_api: Api, case: str) -> None:
    caller = sqlite_api.tenant()
    data, line, field = BAD_FILES[case]
    response = caller.upload_corpus(data, filename="bad.jsonl")
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_corpus"
    assert body["line"] == line
    if field is not None:
        assert body["field"] == field
    assert body["detail"].startswith("bad.jsonl: ")
    # Nothing is stored or recorded for an invalid file.
    assert sqlite_api.stored() == []
    assert caller.get("/v1/corpora").json() == {"data": [], "count": 0}


def test_a_multipart_body_without_the_file_field_is_refused(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    response = caller.post("/v1/corpora", data={"name": "no file"}, files={"other": ("x", b"1")})
    assert response.status_code == 422
    assert response.json()["field"] == "file"
    response = caller.post("/v1/corpora", json={"file": "x"})
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"


@pytest.fixture
def small_limit_api(
    tmp_path: Path, sqlite_url: str, model_store: Path, broker_dir: Path
) -> Iterator[Api]:
    """The API with a 1000-byte upload limit."""
    yield from start_api(tmp_path, sqlite_url, model_store, max_upload_bytes=1000)


def test_oversized_upload_is_refused_by_content_length(small_limit_api: Api) -> None:
    caller = small_limit_api.tenant()
    response = caller.upload_corpus(corpus_bytes(200))
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"
    assert response.json()["limit"] == 1000
    assert small_limit_api.stored() == []
    # A file just under the limit passes.
    assert caller.upload_corpus(corpus_bytes(5)).status_code == 201


def _chunked_multipart(data: bytes, boundary: str) -> Iterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
           f"filename=\"big.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    for start in range(0, len(data), 4096):
        yield data[start : start + 4096]
    yield f"\r\n--{boundary}--\r\n".encode()


def _asgi_post(
    api: Api,
    path: str,
    headers: dict[str, str],
    chunks: list[bytes],
    before_chunk: Callable[[int], None] | None = None,
) -> tuple[int, dict, int]:
    """POST a chunked body straight into the ASGI app; returns (status, json, chunks read).
    `before_chunk(n)` runs as the app asks for the n-th chunk (1-based)."""
    pulled = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            if before_chunk is not None:
                before_chunk(pulled)
            return {"type": "http.request", "body": chunks[pulled - 1],
                    "more_body": pulled < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("test", 80), "client": ("test", 1),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "state": {},
    }
    asyncio.run(api.app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


def test_oversized_upload_without_content_length_is_cut_off(small_limit_api: Api) -> None:
    caller = small_limit_api.tenant()
    boundary = uuid.uuid4().hex
    chunks = list(_chunked_multipart(corpus_bytes(5000), boundary))
    headers = {
        **caller.headers,
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Transfer-Encoding": "chunked",
    }
    status, body, pulled = _asgi_post(small_limit_api, "/v1/corpora", headers, chunks)
    assert status == 413, body
    assert body["error"] == "payload_too_large"
    assert small_limit_api.stored() == []
    # The server stopped reading about where the limit (+ form framing) was crossed.
    assert pulled * 4096 < 80 * 1024 < len(chunks) * 4096


def test_a_corpus_row_that_cannot_be_written_leaves_no_stored_file(api: Api) -> None:
    caller = api.tenant()
    with rows_refused(api, "corpora"):  # the database refuses the row after the file is stored
        response = TestClient(api.app, raise_server_exceptions=False).post(
            "/v1/corpora", headers=caller.headers, files={"file": ("c.jsonl", corpus_bytes(3))}
        )
    assert response.status_code == 500
    assert caller.get("/v1/corpora").json()["count"] == 0
    assert not [key for key in api.stored() if key.startswith("corpora/")]
    assert caller.upload_corpus(corpus_bytes(3)).status_code == 201  # and the next one works


def test_listing_is_paginated_newest_first(api: Api) -> None:
    caller = api.tenant()
    ids = [caller.upload_corpus(corpus_bytes(2), name=f"c{i}").json()["id"] for i in range(5)]
    first = caller.get("/v1/corpora", params={"limit": 2}).json()
    assert first["count"] == 5
    assert [c["id"] for c in first["data"]] == ids[::-1][:2]
    rest = caller.get("/v1/corpora", params={"offset": 2, "limit": 10}).json()
    assert [c["id"] for c in rest["data"]] == ids[::-1][2:]
    bad = caller.get("/v1/corpora", params={"limit": 0})
    assert bad.status_code == 422 and bad.json()["field"] == "limit"


def test_delete_removes_the_corpus_and_its_file(api: Api) -> None:
    caller = api.tenant()
    corpus = caller.corpus()
    assert caller.delete(f"/v1/corpora/{corpus['id']}").status_code == 204
    assert caller.get(f"/v1/corpora/{corpus['id']}").status_code == 404
    assert caller.get("/v1/corpora").json()["count"] == 0
    assert not any(key.startswith(f"corpora/{corpus['id']}") for key in api.stored())
    assert caller.delete(f"/v1/corpora/{corpus['id']}").status_code == 404


def test_a_corpus_in_use_by_an_unfinished_job_cannot_be_deleted(api: Api) -> None:
    caller = api.tenant()
    corpus = caller.corpus()
    job = caller.job(corpus["id"])
    response = caller.delete(f"/v1/corpora/{corpus['id']}")
    assert response.status_code == 409
    assert response.json()["error"] == "in_use"
    assert response.json()["job_id"] == job["id"]
    # Once the job has finished, the corpus can go.
    with api.session() as session:
        session.get(Job, job["id"]).status = JobStatus.SUCCEEDED
        session.commit()
    assert caller.delete(f"/v1/corpora/{corpus['id']}").status_code == 204
    assert caller.get(f"/v1/jobs/{job['id']}").status_code == 200
    assert json.loads(json.dumps(caller.get(f"/v1/jobs/{job['id']}").json()))["corpus_id"]
