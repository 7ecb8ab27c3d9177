"""Request ids on every response and error body, and the structured logs that carry them (with
tenant, key and resource ids, never keys or customer text)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.logs import TextFormatter, bind, configure_logging, log_scope
from tests.api_support import Api, job_body, rows_refused

pytest_plugins = ["tests.api_fixtures"]

REPO = Path(__file__).resolve().parents[1]


def test_a_valid_client_request_id_is_kept_and_returned(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    for given in ("abc-123", "trace:4bf92f3577b34da6a3ce929d0e0e4736.00f067aa0ba902b7", "x" * 128):
        response = sqlite_api.client.get("/v1/corpora",
                                         headers={**caller.headers, "X-Request-ID": given})
        assert response.headers["x-request-id"] == given


@pytest.mark.parametrize("given", ["", "x" * 129, "has space", "tab\there", "quote\"", "a/b"])
def test_an_invalid_client_request_id_is_replaced(sqlite_api: Api, given: str) -> None:
    response = sqlite_api.client.get("/healthz", headers={"X-Request-ID": given})
    generated = response.headers["x-request-id"]
    assert generated.startswith("req_") and len(generated) == 36 and generated != given


def test_every_response_and_every_error_body_carries_the_request_id(api: Api) -> None:
    caller = api.tenant()
    corpus = caller.corpus(2)
    client = TestClient(api.app, raise_server_exceptions=False)
    responses = [
        client.get("/healthz"),
        client.get("/no/such/route"),
        client.get("/v1/corpora"),  # 401
        client.get("/v1/corpora/crp_missing", headers=caller.headers),  # 404
        client.post("/v1/jobs", json={"corpus_id": 7}, headers=caller.headers),  # 422
        client.post("/v1/corpora", headers=caller.headers, content=b"x"),  # 422, no multipart
    ]
    with rows_refused(api, "jobs"):  # the database refuses the row: an unhandled error
        responses.append(client.post("/v1/jobs", json=job_body(corpus["id"]),
                                     headers=caller.headers))
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 404, 401, 404, 422, 422, 500]
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == len(ids)
    for response in responses[1:]:
        body = response.json()
        assert body["request_id"] == response.headers["x-request-id"], body
        assert {"error", "detail"} <= body.keys()
    assert responses[-1].json()["error"] == "internal_error"


def _log_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_request_lines_are_json_with_the_ids_and_never_keys_or_text(
    sqlite_api: Api, capfd: pytest.CaptureFixture[str]
) -> None:
    caller = sqlite_api.tenant()
    secret_text = "a passage about the confidential turbine blade alloy"
    data = json.dumps({"_id": "d1", "text": secret_text}).encode()
    corpus = caller.upload_corpus(data).json()
    job = caller.job(corpus["id"])
    sqlite_api.client.get(f"/v1/jobs/{job['id']}",
                          headers={**caller.headers, "X-Request-ID": "trace-42"})
    sqlite_api.client.get("/v1/corpora", headers={"Authorization": "Bearer tlr_" + "w" * 40})
    err = capfd.readouterr().err
    assert caller.key not in err and "tlr_" + "w" * 40 not in err
    assert secret_text not in err and "turbine" not in err
    lines = [line for line in _log_lines(err) if line["logger"] == "app.requests"]
    created = next(line for line in lines if line["route"] == "/v1/jobs"
                   and line["method"] == "POST")
    assert created["job_id"] == job["id"] and created["tenant_id"] == caller.tenant_id
    assert created["status"] == 201 and created["key_id"].startswith("key_")
    read = next(line for line in lines if line["request_id"] == "trace-42")
    assert (read["route"], read["job_id"], read["status"]) == (
        "/v1/jobs/{job_id}", job["id"], 200)
    assert {"ts", "level", "message", "duration_ms"} <= read.keys()
    refused = next(line for line in lines if line["status"] == 401)
    assert "tenant_id" not in refused


def test_a_log_line_inside_a_request_carries_its_ids(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")
    log = logging.getLogger("tailor.test")
    with log_scope(request_id="req_1"):
        bind(tenant_id="ten_1")
        with log_scope(job_id="job_1", stage="distill"):
            log.info("stage started", extra={"epoch": 2})
        log.warning("after the stage")
    log.info("outside")
    lines = [line for line in _log_lines(capfd.readouterr().err)
             if line["logger"] == "tailor.test"]
    assert lines[0] | {"ts": ""} == {
        "ts": "", "level": "info", "logger": "tailor.test", "message": "stage started",
        "request_id": "req_1", "tenant_id": "ten_1", "job_id": "job_1", "stage": "distill",
        "epoch": 2,
    }
    assert "job_id" not in lines[1] and lines[1]["tenant_id"] == "ten_1"
    assert "request_id" not in lines[2]


def test_the_text_format_is_readable(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging("text")
    try:
        with log_scope(request_id="req_2"):
            logging.getLogger("tailor.test").info("hello")
        line = next(line for line in capfd.readouterr().err.splitlines() if "hello" in line)
        assert line.endswith("INFO tailor.test hello request_id=req_2")
    finally:
        configure_logging("json")
    assert isinstance(TextFormatter(), logging.Formatter)


def test_the_log_module_needs_no_web_framework() -> None:
    # The worker configures its logs with it: importing it must not pull in the HTTP stack.
    code = ("import sys, app.logs; "
            "print([m for m in ('fastapi', 'starlette', 'app.main') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"
