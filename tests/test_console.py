"""The console's rules, over HTTP against the real app: sign-in sessions, cookies, CSRF,
tenant scoping, and what its forms do (the browser walk-through is tests/console_browser.py)."""

from __future__ import annotations

import json
import logging
import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db.base import utcnow
from app.db.models import ApiKey, ConsoleSession, Job, JobStatus
from app.openapi import openapi_document
from app.tenants.service import revoke_api_key
from tests.api_support import Api, Caller, corpus_bytes
from tests.report_samples import sample_report

pytest_plugins = ["tests.api_fixtures"]


def _hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden {name} in the page"
    return match.group(1)


def _sign_in(client: TestClient, key: str, next_path: str = "") -> object:
    form = client.get("/console/sign-in")
    assert form.status_code == 200
    data = {"api_key": key, "csrf_token": _hidden(form.text, "csrf_token"), "next": next_path}
    return client.post("/console/sign-in", data=data, follow_redirects=False)


def _browser(api: Api, caller: Caller, base_url: str = "http://testserver") -> TestClient:
    """A separate cookie jar (one browser) signed in as `caller`."""
    client = TestClient(api.app, base_url=base_url)
    response = _sign_in(client, caller.key)
    assert response.status_code == 303, response.text
    return client


def _csrf(client: TestClient, path: str = "/console/jobs") -> str:
    return _hidden(client.get(path).text, "csrf_token")


def test_sign_in_opens_a_session_that_holds_no_key(
    sqlite_api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caller = sqlite_api.tenant()
    client = TestClient(sqlite_api.app)
    asked = client.get("/console/corpora", follow_redirects=False)
    assert asked.status_code == 303
    assert asked.headers["location"] == "/console/sign-in?next=/console/corpora"
    assert _sign_in(client, "tlr_" + "x" * 40).status_code == 401
    response = _sign_in(client, caller.key, "/console/corpora")
    assert response.status_code == 303 and response.headers["location"] == "/console/corpora"
    cookie = next(c for c in response.headers.get_list("set-cookie")
                  if c.startswith("tailor_console="))
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/console"} <= attributes
    assert "secure" not in attributes  # plain HTTP here; see the TLS test
    token = cookie.split(";")[0].split("=", 1)[1]
    assert caller.key not in cookie
    with sqlite_api.session() as session:
        rows = session.scalars(select(ConsoleSession)).all()
        stored = json.dumps([[str(v) for v in vars(r).values()] for r in rows])
    assert rows and token not in stored and caller.key not in stored
    assert caller.key not in caplog.text and token not in caplog.text
    assert client.get("/console/corpora").status_code == 200


def test_the_cookie_is_secure_over_tls(sqlite_api: Api) -> None:
    client = TestClient(sqlite_api.app, base_url="https://testserver")
    response = _sign_in(client, sqlite_api.tenant().key)
    cookie = next(c for c in response.headers.get_list("set-cookie")
                  if c.startswith("tailor_console="))
    assert "secure" in cookie.lower()


def test_sign_in_needs_its_form_token_and_goes_nowhere_else(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    # Another site posting a key into our sign-in form (login CSRF) has no sign-in cookie.
    forged = TestClient(sqlite_api.app).post(
        "/console/sign-in", data={"api_key": caller.key, "csrf_token": "guess"},
        follow_redirects=False,
    )
    assert forged.status_code == 403 and "tailor_console=" not in str(forged.headers)
    client = TestClient(sqlite_api.app)
    response = _sign_in(client, caller.key, "https://evil.example/steal")
    assert response.headers["location"] == "/console/jobs"


def test_every_form_needs_the_sessions_csrf_token(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus()
    client = _browser(sqlite_api, caller)
    other = _browser(sqlite_api, sqlite_api.tenant("other"))
    body = {"corpus_id": corpus["id"], "base_model": "tiny-student", "preset": "quick"}
    for token in ("", "0" * 64, _csrf(other)):
        response = client.post("/console/jobs", data={**body, "csrf_token": token})
        assert response.status_code == 403, token
        upload = client.post("/console/corpora", data={"csrf_token": token},
                             files={"file": ("c.jsonl", corpus_bytes(3))})
        assert upload.status_code == 403
        assert client.post("/console/sign-out", data={"csrf_token": token}).status_code == 403
    assert caller.get("/v1/jobs").json()["count"] == 0
    assert caller.get("/v1/corpora").json()["count"] == 1
    assert client.get("/console/jobs").status_code == 200  # still signed in


def test_sign_out_revoking_the_key_or_time_ends_the_session(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    first = _browser(sqlite_api, caller)
    response = first.post("/console/sign-out", data={"csrf_token": _csrf(first)},
                          follow_redirects=False)
    assert response.status_code == 303
    assert first.get("/console/jobs", follow_redirects=False).status_code == 303
    second = _browser(sqlite_api, caller)
    with sqlite_api.session() as session:
        for row in session.scalars(select(ConsoleSession)):
            row.expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
    assert second.get("/console/jobs", follow_redirects=False).status_code == 303
    third = _browser(sqlite_api, caller)
    with sqlite_api.session() as session:
        key_id = session.scalar(select(ConsoleSession.api_key_id))
        assert revoke_api_key(session, key_id)
        session.commit()
    assert third.get("/console/jobs", follow_redirects=False).status_code == 303
    assert _sign_in(TestClient(sqlite_api.app), caller.key).status_code == 401


def test_only_a_train_key_signs_in_and_a_key_expiry_ends_its_session(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    embed = caller.post("/v1/api-keys", json={"scope": "embed"}).json()["key"]
    refused = _sign_in(TestClient(sqlite_api.app), embed)
    assert refused.status_code == 403 and "train key" in refused.text
    expiring = caller.post("/v1/api-keys", json={"expires_in_days": 1}).json()
    with sqlite_api.session() as session:  # the key ends in an hour, before a session would
        session.get(ApiKey, expiring["id"]).expires_at = utcnow() + timedelta(hours=1)
        session.commit()
    browser = _browser(sqlite_api, Caller(sqlite_api, caller.tenant_id, expiring["key"]))
    with sqlite_api.session() as session:
        row = session.scalar(select(ConsoleSession)
                             .where(ConsoleSession.api_key_id == expiring["id"]))
        assert row.expires_at <= utcnow() + timedelta(hours=1)
        session.get(ApiKey, expiring["id"]).expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
    assert browser.get("/console/jobs", follow_redirects=False).status_code == 303
    assert _sign_in(TestClient(sqlite_api.app), expiring["key"]).status_code == 401


def test_pages_are_strict_and_left_out_of_the_api_document(sqlite_api: Api) -> None:
    client = _browser(sqlite_api, sqlite_api.tenant())
    for path in ("/console/jobs", "/console/corpora", "/console/models", "/console/embed"):
        response = client.get(path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        # Everything the page links to is on this server (or the empty favicon).
        for url in re.findall(r'(?:src|href)="([^"]+)"', response.text):
            assert url == "data:," or url.startswith(("/", "?", "#")), url
            assert not url.startswith("//"), url
    assert not [p for p in openapi_document()["paths"] if p.startswith("/console")]


def test_an_invalid_upload_is_explained_and_nothing_is_kept(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    client = _browser(sqlite_api, caller)
    bad = corpus_bytes(3) + b'{"_id": "d9", "title": "no text"}\n'
    response = client.post("/console/corpora", data={"csrf_token": _csrf(client)},
                           files={"file": ("bad.jsonl", bad)})
    assert response.status_code == 422
    assert "bad.jsonl" in response.text and "line 4" in response.text
    assert caller.get("/v1/corpora").json()["count"] == 0
    good = client.post("/console/corpora", data={"csrf_token": _csrf(client), "name": "mine"},
                       files={"file": ("c.jsonl", corpus_bytes(3))}, follow_redirects=False)
    assert good.status_code == 303 and "added=crp_" in good.headers["location"]
    assert caller.get("/v1/corpora").json()["data"][0]["name"] == "mine"


def test_the_job_form_starts_one_job_per_form_and_explains_mistakes(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus()
    client = _browser(sqlite_api, caller)
    form = client.get(f"/console/jobs?corpus={corpus['id']}").text
    body = {
        "csrf_token": _hidden(form, "csrf_token"), "form_id": _hidden(form, "form_id"),
        "corpus_id": corpus["id"], "base_model": "tiny-student", "preset": "quick",
        "teacher": "tiny-teacher", "generator": "tiny-generator",
        "query_types": ["questions", "keywords"], "passages": "30",
        "hyperparameters": json.dumps({"training": {"max_epochs": 1}}),
    }
    first = client.post("/console/jobs", data=body, follow_redirects=False)
    assert first.status_code == 303, first.text
    job_id = first.headers["location"].rsplit("/", 1)[1]
    job = caller.get(f"/v1/jobs/{job_id}").json()
    assert job["recipe"]["training"]["max_epochs"] == 1
    assert job["recipe"]["generation"]["query_types"] == ["questions", "keywords"]
    # A double submit of the same form is the same job (its form id is the Idempotency-Key).
    again = client.post("/console/jobs", data=body, follow_redirects=False)
    assert again.headers["location"] == first.headers["location"]
    assert caller.get("/v1/jobs").json()["count"] == 1
    broken = client.post("/console/jobs", data={**body, "form_id": "f2",
                                                "hyperparameters": '{"training": '})
    assert broken.status_code == 422 and "hyperparameters: not valid JSON" in broken.text
    wrong = client.post("/console/jobs", data={**body, "form_id": "f3",
                                               "hyperparameters": '{"training": {"lr": 1}}'})
    assert wrong.status_code == 422 and "hyperparameters.training.lr" in wrong.text
    assert caller.get("/v1/jobs").json()["count"] == 1
    # Example queries, one per line, for the like_examples type; kept in the form on a mistake.
    examples = "  panel flutter at supersonic speed\n\nheat transfer to a yawed cylinder  \n"
    unticked = client.post("/console/jobs", data={**body, "form_id": "f4",
                                                  "example_queries": examples})
    assert unticked.status_code == 422
    assert "add like_examples to generation.query_types" in unticked.text
    assert "panel flutter at supersonic speed" in unticked.text
    twice = client.post("/console/jobs", data={
        **body, "form_id": "f5", "example_queries": examples,
        "hyperparameters": json.dumps({"generation": {"example_queries": ["drag"]}})})
    assert twice.status_code == 422 and "given both in the box" in twice.text
    styled = client.post("/console/jobs", data={
        **body, "form_id": "f6", "example_queries": examples,
        "query_types": ["questions", "like_examples"]}, follow_redirects=False)
    assert styled.status_code == 303, styled.text
    recipe = caller.get(f"/v1/jobs/{styled.headers['location'].rsplit('/', 1)[1]}").json()[
        "recipe"]
    assert recipe["generation"]["example_queries"] == [
        "panel flutter at supersonic speed", "heat transfer to a yawed cylinder"]
    assert recipe["generation"]["query_types"] == ["questions", "like_examples"]
    assert recipe["training"]["max_epochs"] == 1  # the JSON overrides still apply beside them


def test_job_pages_show_only_the_tenants_jobs_and_say_when_there_is_no_report(
    sqlite_api: Api,
) -> None:
    caller = sqlite_api.tenant()
    job = caller.job(caller.corpus()["id"])
    client = _browser(sqlite_api, caller)
    page = client.get(f"/console/jobs/{job['id']}")
    assert page.status_code == 200 and "queued" in page.text and "Cancel job" in page.text
    live = client.get(f"/console/jobs/{job['id']}/live")
    assert live.headers["x-console-active"] == "1"
    early = client.get(f"/console/jobs/{job['id']}/report")
    assert early.status_code == 409 and "once it has succeeded" in early.text
    stranger = _browser(sqlite_api, sqlite_api.tenant("other"))
    assert stranger.get(f"/console/jobs/{job['id']}").status_code == 404
    assert job["id"] not in stranger.get("/console/jobs").text
    with sqlite_api.session() as session:
        session.get(Job, job["id"]).status = JobStatus.SUCCEEDED
        session.commit()
    sqlite_api.app.state.store.put_bytes(f"jobs/{job['id']}/evaluate/report.json",
                                         json.dumps(sample_report(queries=40)).encode())
    report = client.get(f"/console/jobs/{job['id']}/report")
    assert report.status_code == 200 and "Use the tuned model" in report.text
    assert client.get(f"/console/jobs/{job['id']}/live").headers["x-console-active"] == "0"
    assert stranger.get(f"/console/jobs/{job['id']}/report").status_code == 404


def test_cancel_from_the_job_page(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    job = caller.job(caller.corpus()["id"])
    client = _browser(sqlite_api, caller)
    token = _csrf(client, f"/console/jobs/{job['id']}")
    done = client.post(f"/console/jobs/{job['id']}/cancel", data={"csrf_token": token},
                       follow_redirects=False)
    assert done.status_code == 303
    assert caller.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    again = client.post(f"/console/jobs/{job['id']}/cancel", data={"csrf_token": token})
    assert again.status_code == 409 and "already finished" in again.text


def test_the_embedding_box_ranks_passages_with_the_models_own_vectors(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    client = _browser(sqlite_api, caller)
    passages = ["the pressure on a wing", "heat flux in a boundary layer"]
    response = client.post("/console/embed", data={
        "csrf_token": _csrf(client, "/console/embed"), "model": "tiny-student",
        "query": "wing pressure", "passages": "\n".join(passages),
    })
    assert response.status_code == 200, response.text
    served = caller.post("/v1/embed", json={"model": "tiny-student", "inputs": ["wing pressure"],
                                            "input_type": "query"}).json()
    assert f"{served['dim']}-dimensional query vector" in response.text
    assert f"{served['data'][0]['embedding'][0]:.4f}" in response.text
    for text in passages:
        assert text in response.text
    missing = client.post("/console/embed", data={
        "csrf_token": _csrf(client, "/console/embed"), "model": "mdl_nope", "query": "q",
    })
    assert missing.status_code == 404 and "mdl_nope" in missing.text
