"""Query sets: a customer's own unjudged queries, uploaded once and trained on by jobs."""

from __future__ import annotations

import json

from tests.api_support import Api, Caller, job_body, qrels_bytes, queries_bytes, rows_refused

pytest_plugins = ["tests.api_fixtures"]


def _upload(caller: Caller, corpus_id: str, queries: bytes, **form: str):
    return caller.post("/v1/query-sets", data={"corpus_id": corpus_id, **form},
                       files={"queries": ("log.jsonl", queries)})


def _log(texts: list[str]) -> bytes:
    return "".join(json.dumps({"_id": f"l{i}", "text": t}) + "\n"
                   for i, t in enumerate(texts)).encode()


def test_upload_list_and_read_count_each_query_once(api: Api) -> None:
    caller = api.tenant()
    corpus = caller.corpus(5)
    log = _log(["wing flutter", "Wing  FLUTTER", "heat transfer", "shock on a cone"])
    response = _upload(caller, corpus["id"], log, name="search log")
    assert response.status_code == 201, response.text
    query_set = response.json()
    assert query_set["id"].startswith("qrs_")
    assert (query_set["corpus_id"], query_set["name"]) == (corpus["id"], "search log")
    assert query_set["queries"] == 3  # the repeat counts once
    assert (api.objects / f"query_sets/{query_set['id']}/queries.jsonl").read_bytes() == log
    assert caller.get(f"/v1/query-sets/{query_set['id']}").json() == query_set
    assert caller.get("/v1/query-sets").json() == {"data": [query_set], "count": 1}
    other = api.tenant()
    assert other.get(f"/v1/query-sets/{query_set['id']}").status_code == 404
    assert other.get("/v1/query-sets").json()["count"] == 0


def test_a_bad_line_is_located_and_nothing_is_stored(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus(3)
    response = _upload(caller, corpus["id"], b'{"_id": "a", "text": "wing"}\n{"_id": "b"}\n')
    assert response.status_code == 422, response.text
    body = response.json()
    assert (body["error"], body["file"], body["line"], body["field"]) == (
        "invalid_query_set", "queries", 2, "text")
    assert "log.jsonl" in body["detail"]
    assert not any(key.startswith("query_sets/") for key in sqlite_api.stored())
    assert caller.get("/v1/query-sets").json()["count"] == 0


def test_a_query_set_row_that_cannot_be_written_leaves_no_stored_file(api: Api) -> None:
    from fastapi.testclient import TestClient

    caller = api.tenant()
    corpus = caller.corpus(3)
    with rows_refused(api, "query_sets"):
        response = TestClient(api.app, raise_server_exceptions=False).post(
            "/v1/query-sets", headers=caller.headers, data={"corpus_id": corpus["id"]},
            files={"queries": ("log.jsonl", _log(["wing flutter"]))},
        )
    assert response.status_code == 500
    assert not [key for key in api.stored() if key.startswith("query_sets/")]


def test_corpus_id_is_required_and_must_be_the_callers(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    response = caller.post("/v1/query-sets", files={"queries": ("q", _log(["wing"]))})
    assert response.status_code == 422 and response.json()["field"] == "corpus_id"
    assert _upload(caller, "crp_" + "0" * 24, _log(["wing"])).status_code == 404
    other_corpus = sqlite_api.tenant().corpus(3)
    assert _upload(caller, other_corpus["id"], _log(["wing"])).status_code == 404


def test_a_job_takes_a_query_set_of_its_own_corpus_only(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    corpus, elsewhere = caller.corpus(3), caller.corpus(4)
    query_set = _upload(caller, corpus["id"], _log(["wing flutter"])).json()
    job = caller.job(corpus["id"], query_set_id=query_set["id"])
    assert job["query_set_id"] == query_set["id"]
    assert caller.get(f"/v1/jobs/{job['id']}").json()["query_set_id"] == query_set["id"]
    response = caller.post("/v1/jobs", json={
        "corpus_id": elsewhere["id"], **{k: v for k, v in job["spec"].items()
                                         if k not in ("corpus_id",)}})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "query_set_id"
    unknown = caller.post("/v1/jobs", json={**job["spec"], "query_set_id": "qrs_" + "0" * 24})
    assert unknown.status_code == 404


def test_a_job_without_synthetic_queries_needs_a_query_set_and_an_eval_set(
    sqlite_api: Api,
) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus(3)
    off = {"hyperparameters": {"generation": {"synthetic": False}}}
    response = caller.post("/v1/jobs", json={**job_body(corpus["id"]), **off})
    assert response.status_code == 422 and response.json()["field"] == "query_set_id"
    query_set = _upload(caller, corpus["id"], _log(["wing flutter"])).json()
    body = {**job_body(corpus["id"]), **off, "query_set_id": query_set["id"]}
    response = caller.post("/v1/jobs", json=body)
    assert response.status_code == 422 and response.json()["field"] == "eval_set_id"
    eval_set = caller.post(
        "/v1/eval-sets", data={"corpus_id": corpus["id"]},
        files={"queries": ("q.jsonl", queries_bytes(["q1"])),
               "qrels": ("qrels.tsv", qrels_bytes([("q1", "d1", 1)]))},
    ).json()
    response = caller.post("/v1/jobs", json={**body, "eval_set_id": eval_set["id"]})
    assert response.status_code == 201, response.text
