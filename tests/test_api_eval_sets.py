"""Eval set upload: judgements must name known queries and documents of the corpus."""

from __future__ import annotations

import gzip

import pytest
from fastapi.testclient import TestClient

from tests.api_support import Api, Caller, qrels_bytes, queries_bytes, rows_refused

pytest_plugins = ["tests.api_fixtures"]


def _upload(caller: Caller, corpus_id: str, queries: bytes, qrels: bytes, **form: str):
    return caller.post(
        "/v1/eval-sets",
        data={"corpus_id": corpus_id, **form},
        files={"queries": ("queries.jsonl", queries), "qrels": ("qrels.tsv", qrels)},
    )


def test_upload_list_and_read(api: Api) -> None:
    caller = api.tenant()
    corpus = caller.corpus(5)
    qrels = qrels_bytes([("q1", "d1", 1), ("q1", "d2", 0), ("q2", "d3", 2)])
    response = _upload(caller, corpus["id"], queries_bytes(["q1", "q2", "q3"]), qrels, name="gold")
    assert response.status_code == 201, response.text
    eval_set = response.json()
    assert eval_set["id"].startswith("evs_")
    assert eval_set["corpus_id"] == corpus["id"]
    assert eval_set["name"] == "gold"
    assert eval_set["queries"] == 2  # q3 has no judgement
    assert eval_set["judgements"] == 3
    assert (api.objects / f"eval_sets/{eval_set['id']}/qrels.tsv").read_bytes() == qrels
    assert (api.objects / f"eval_sets/{eval_set['id']}/queries.jsonl").is_file()
    assert caller.get(f"/v1/eval-sets/{eval_set['id']}").json() == eval_set
    assert caller.get("/v1/eval-sets").json() == {"data": [eval_set], "count": 1}


def test_a_long_queries_file_name_names_the_eval_set_cut_to_fit(api: Api) -> None:
    caller = api.tenant()
    corpus = caller.corpus(3)
    filename = "q" * 230 + ".jsonl"
    response = caller.post(
        "/v1/eval-sets",
        data={"corpus_id": corpus["id"]},
        files={"queries": (filename, queries_bytes(["q1"])),
               "qrels": ("qrels.tsv", qrels_bytes([("q1", "d1", 1)]))},
    )
    assert response.status_code == 201, response.text
    assert response.json()["name"] == filename[:200]


def test_an_eval_set_row_that_cannot_be_written_leaves_no_stored_files(api: Api) -> None:
    caller = api.tenant()
    corpus = caller.corpus(5)
    with rows_refused(api, "eval_sets"):  # the database refuses the row after the upload
        response = TestClient(api.app, raise_server_exceptions=False).post(
            "/v1/eval-sets",
            headers=caller.headers,
            data={"corpus_id": corpus["id"]},
            files={"queries": ("q.jsonl", queries_bytes(["q1"])),
                   "qrels": ("qrels.tsv", qrels_bytes([("q1", "d1", 1)]))},
        )
    assert response.status_code == 500
    assert caller.get("/v1/eval-sets").json()["count"] == 0
    assert not [key for key in api.stored() if key.startswith("eval_sets/")]


def test_gzip_queries_are_accepted(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus(3)
    queries = gzip.compress(queries_bytes(["q1"]))
    response = _upload(caller, corpus["id"], queries, qrels_bytes([("q1", "d0", 1)], header=False))
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    ("queries", "qrels", "expected"),
    [
        # qrels naming a query the queries file lacks
        (["q1"], [("q1", "d1", 1), ("q9", "d1", 1)], {"field": "query-id", "ids": ["q9"]}),
        # qrels naming documents the corpus lacks
        (["q1"], [("q1", "d1", 1), ("q1", "nope", 1)], {"field": "corpus-id", "ids": ["nope"]}),
    ],
)
def test_judgements_must_name_known_ids(
    sqlite_api: Api, queries: list[str], qrels: list[tuple[str, str, int]], expected: dict
) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus(3)
    response = _upload(caller, corpus["id"], queries_bytes(queries), qrels_bytes(qrels))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_eval_set"
    assert body["file"] == "qrels"
    for key, value in expected.items():
        assert body[key] == value
    assert not any(key.startswith("eval_sets/") for key in sqlite_api.stored())


def test_malformed_files_are_located(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus(3)
    bad_qrels = b"query-id\tcorpus-id\tscore\nq1\td1\tvery\n"
    response = _upload(caller, corpus["id"], queries_bytes(["q1"]), bad_qrels)
    assert response.status_code == 422
    assert response.json() | {"detail": "", "request_id": ""} == {
        "error": "invalid_eval_set", "detail": "", "file": "qrels", "line": 2, "field": "score",
        "request_id": "",
    }
    bad_queries = b'{"_id": "q1", "text": "ok"}\n{"_id": "q2"}\n'
    response = _upload(caller, corpus["id"], bad_queries, qrels_bytes([("q1", "d1", 1)]))
    assert response.status_code == 422
    assert (response.json()["file"], response.json()["line"]) == ("queries", 2)


def test_corpus_id_is_required_and_must_be_the_callers(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    response = caller.post(
        "/v1/eval-sets",
        files={"queries": ("q", queries_bytes(["q1"])), "qrels": ("r", qrels_bytes([]))},
    )
    assert response.status_code == 422 and response.json()["field"] == "corpus_id"
    response = _upload(caller, "crp_" + "0" * 24, queries_bytes(["q1"]),
                       qrels_bytes([("q1", "d1", 1)]))
    assert response.status_code == 404
