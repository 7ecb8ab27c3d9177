"""Hostile and careless input over HTTP: every case is refused with a 4xx naming what is wrong
(file, line, field), never a 500, and nothing is stored."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api_support import (
    Api,
    Caller,
    job_body,
    qrels_bytes,
    queries_bytes,
    start_api,
)

pytest_plugins = ["tests.api_fixtures"]

Upload = Callable[[Caller, bytes], Any]


def _corpus(caller: Caller, data: bytes) -> Any:
    return caller.upload_corpus(data, filename="hostile.jsonl")


def _eval_queries(caller: Caller, data: bytes) -> Any:
    corpus = caller.corpus(3)
    return caller.post("/v1/eval-sets", data={"corpus_id": corpus["id"]},
                       files={"queries": ("hostile.jsonl", data),
                              "qrels": ("qrels.tsv", qrels_bytes([("q1", "d1", 1)]))})


def _eval_qrels(caller: Caller, data: bytes) -> Any:
    corpus = caller.corpus(3)
    return caller.post("/v1/eval-sets", data={"corpus_id": corpus["id"]},
                       files={"queries": ("queries.jsonl", queries_bytes(["q1"])),
                              "qrels": ("hostile.tsv", data)})


def _query_set(caller: Caller, data: bytes) -> Any:
    corpus = caller.corpus(3)
    return caller.post("/v1/query-sets", data={"corpus_id": corpus["id"]},
                       files={"queries": ("hostile.jsonl", data)})


# (upload, its error code, the form field of the file)
JSONL_UPLOADS = {
    "corpus": (_corpus, "invalid_corpus", "file"),
    "eval-set-queries": (_eval_queries, "invalid_eval_set", "queries"),
    "query-set": (_query_set, "invalid_query_set", "queries"),
}
ALL_UPLOADS = {**JSONL_UPLOADS, "eval-set-qrels": (_eval_qrels, "invalid_eval_set", "qrels")}


def _refused(api: Api, response: Any, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    assert body["request_id"] == response.headers["x-request-id"]
    # Nothing of the refused upload was stored (the corpora the helpers upload first aside).
    assert not [key for key in api.stored()
                if key.startswith(("eval_sets/", "query_sets/"))], api.stored()
    return body


def _lines(count: int, with_id: bool = True) -> list[str]:
    return [json.dumps({"_id": f"d{i}", "text": f"passage {i} on supersonic flow"}
                       if with_id else {"_id": f"q{i}", "text": f"question {i}?"})
            for i in range(count)]


@pytest.mark.parametrize("route", sorted(ALL_UPLOADS))
def test_corrupt_gzip_data_is_a_422_naming_the_file(sqlite_api: Api, route: str) -> None:
    upload, error, field = ALL_UPLOADS[route]
    text = ("query-id\tcorpus-id\tscore\n" + "".join(f"q1\td{i}\t1\n" for i in range(200))
            if route == "eval-set-qrels" else "\n".join(_lines(200)) + "\n")
    data = bytearray(gzip.compress(text.encode()))
    data[15:26] = b"\xff" * 11  # what the report did: 200 valid lines, bytes 15-25 overwritten
    body = _refused(sqlite_api, upload(sqlite_api.tenant(), bytes(data)), 422, error)
    assert body["file"] == field
    assert "hostile" in body["detail"] and "gzip" in body["detail"]


@pytest.mark.parametrize("route", sorted(JSONL_UPLOADS))
def test_deeply_nested_json_is_a_422_naming_the_line(sqlite_api: Api, route: str) -> None:
    upload, error, field = JSONL_UPLOADS[route]
    deep = '{"_id": "x", "text": "t", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    data = ("\n".join([*_lines(2), deep]) + "\n").encode()
    body = _refused(sqlite_api, upload(sqlite_api.tenant(), data), 422, error)
    assert (body["file"], body["line"]) == (field, 3)
    assert "nested too deeply" in body["detail"]


@pytest.mark.parametrize("route", sorted(JSONL_UPLOADS))
def test_an_integer_id_of_5000_digits_is_a_422(sqlite_api: Api, route: str) -> None:
    upload, error, field = JSONL_UPLOADS[route]
    data = ("\n".join([*_lines(1), '{"_id": ' + "7" * 5000 + ', "text": "t"}']) + "\n").encode()
    body = _refused(sqlite_api, upload(sqlite_api.tenant(), data), 422, error)
    assert (body["file"], body["line"]) == (field, 2)
    assert "digits" in body["detail"]


@pytest.mark.parametrize("route", sorted(JSONL_UPLOADS))
@pytest.mark.parametrize("field_name", ["text", "title", "_id"])
def test_a_lone_surrogate_is_a_422_naming_line_and_field(
    sqlite_api: Api, route: str, field_name: str
) -> None:
    upload, error, field = JSONL_UPLOADS[route]
    if field_name == "title" and route != "corpus":
        pytest.skip("queries have no title")
    record = {"_id": "s1", "text": "wing", "title": "t"}
    line = json.dumps(record).replace(f'"{record[field_name]}"', '"bad \\ud800 text"', 1)
    data = ("\n".join([*_lines(1), line]) + "\n").encode()
    body = _refused(sqlite_api, upload(sqlite_api.tenant(), data), 422, error)
    assert (body["file"], body["line"], body["field"]) == (field, 2, field_name)
    assert "surrogate" in body["detail"]


@pytest.fixture
def small_text_api(tmp_path: Path, sqlite_url: str, model_store: Path,
                   broker_dir: Path) -> Iterator[Api]:
    """Limits small enough to cross with a few lines."""
    yield from start_api(tmp_path, sqlite_url, model_store,
                         max_line_bytes=64 * 1024, max_decompressed_bytes=1024 * 1024)


@pytest.mark.parametrize("route", sorted(ALL_UPLOADS))
def test_a_small_gzip_expanding_to_one_huge_line_is_refused_by_its_decompressed_length(
    sqlite_api: Api, route: str
) -> None:
    upload, error, field = ALL_UPLOADS[route]
    # The report's case: ~100 KB of gzip that expands to one 100 MB line.
    data = gzip.compress(b'{"_id": "x", "text": "' + b"a" * 100_000_000 + b'"}\n', 9)
    assert len(data) < 200_000
    body = _refused(sqlite_api, upload(sqlite_api.tenant(), data), 422, error)
    assert (body["file"], body["line"]) == (field, 1)
    assert f"longer than {4 * 1024 * 1024} bytes" in body["detail"]


def test_the_line_limit_counts_every_line_and_names_it(small_text_api: Api) -> None:
    lines = _lines(50)
    lines[41] = json.dumps({"_id": "long", "text": "b" * 70_000})
    data = ("\n".join(lines) + "\n").encode()
    for payload in (data, gzip.compress(data)):
        body = _refused(small_text_api, _corpus(small_text_api.tenant(), payload), 422,
                        "invalid_corpus")
        assert body["line"] == 42


@pytest.mark.parametrize("route", sorted(ALL_UPLOADS))
def test_the_decompressed_size_limit_is_a_413(small_text_api: Api, route: str) -> None:
    upload, _, field = ALL_UPLOADS[route]
    text = ("".join(f"q1\td{i}\t1\n" for i in range(100_000)) if route == "eval-set-qrels"
            else "\n".join(_lines(30_000)) + "\n")
    data = gzip.compress(text.encode())
    assert len(data) < 1024 * 1024 < len(text)
    body = _refused(small_text_api, upload(small_text_api.tenant(), data), 413,
                    "payload_too_large")
    assert (body["file"], body["limit"]) == (field, 1024 * 1024)


def test_a_first_qrels_line_with_a_bad_score_is_a_judgement_not_a_header(
    sqlite_api: Api,
) -> None:
    caller = sqlite_api.tenant()
    for bad in ("high", "1.5", "9" * 30):
        data = f"q1\td1\t{bad}\nq1\td2\t1\n".encode()
        body = _refused(sqlite_api, _eval_qrels(caller, data), 422, "invalid_eval_set")
        assert (body["file"], body["line"], body["field"]) == ("qrels", 1, "score")
    # A real header is still a header, BEIR's or another common one.
    for header in ("query-id\tcorpus-id\tscore", "qid\tdocid\trelevance"):
        response = _eval_qrels(caller, f"{header}\nq1\td1\t1\n".encode())
        assert response.status_code == 201, response.text
        assert response.json()["judgements"] == 1


LIST_ROUTES = ("/v1/corpora", "/v1/eval-sets", "/v1/query-sets", "/v1/jobs", "/v1/models",
               "/v1/api-keys", "/v1/embedding-jobs")


def test_offsets_and_cursors_past_64_bits_are_422(api: Api) -> None:
    caller = api.tenant()
    job = caller.job(caller.corpus(2)["id"])
    for route in LIST_ROUTES:
        for offset in (2**63, 2**64, 10**30):
            response = caller.get(route, params={"offset": offset})
            assert response.status_code == 422, (route, response.text)
            assert response.json()["field"] == "offset"
        # The largest accepted offset is a valid, empty page.
        response = caller.get(route, params={"offset": 2**31 - 1})
        assert response.status_code == 200, (route, response.text)
        assert response.json()["data"] == []
    embedding = caller.post("/v1/embedding-jobs", json={"corpus_id": job["corpus_id"],
                                                        "model": "tiny-student"})
    assert embedding.status_code == 201, embedding.text
    for events in (f"/v1/jobs/{job['id']}/events",
                   f"/v1/embedding-jobs/{embedding.json()['id']}/events"):
        for after in (2**63, 10**30):
            response = caller.get(events, params={"after": after})
            assert response.status_code == 422, response.text
            assert response.json()["field"] == "after"
        assert caller.get(events, params={"after": 2**63 - 1}).json()["data"] == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"hyperparameters": {"seed": 10**23}}, "hyperparameters.seed"),
        ({"hyperparameters": {"seed": -1}}, "hyperparameters.seed"),
        ({"hyperparameters": {"seed": 2**32}}, "hyperparameters.seed"),
        ({"hyperparameters": {"seed": True}}, "hyperparameters.seed"),
        ({"hyperparameters": {"seed": "7"}}, "hyperparameters.seed"),
        ({"passages": True}, "passages"),
        ({"passages": 8.0}, "passages"),
        ({"passages": "8"}, "passages"),
        ({"hyperparameters": {"training": {"max_epochs": True}}},
         "hyperparameters.training.max_epochs"),
        ({"hyperparameters": {"training": {"max_epochs": 2.0}}},
         "hyperparameters.training.max_epochs"),
        ({"hyperparameters": {"training": {"learning_rate": "0.001"}}},
         "hyperparameters.training.learning_rate"),
        ({"hyperparameters": {"corpus": {"dedupe": 1}}}, "hyperparameters.corpus.dedupe"),
        ({"query_types": ["claims", "claims"]}, "query_types"),
        ({"hyperparameters": {"generation": {"query_types": ["titles", "titles"]}}},
         "query_types"),
    ],
)
def test_job_settings_are_strictly_typed_and_bounded(
    sqlite_api: Api, fields: dict[str, Any], field: str
) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus(2)
    response = caller.post("/v1/jobs", json=job_body(corpus["id"], **fields))
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field, response.json()


def test_the_largest_seed_and_a_float_for_a_float_setting_are_accepted(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    corpus = caller.corpus(2)
    job = caller.job(corpus["id"], hyperparameters={"seed": 2**32 - 1,
                                                    "generation": {"temperature": 1}})
    assert job["recipe"]["seed"] == 2**32 - 1
    assert job["recipe"]["generation"]["temperature"] == 1.0


JSON_ROUTES = ("/v1/jobs", "/v1/embed", "/v1/embeddings", "/v1/api-keys")


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"model": "caf\xe9"}', "not valid UTF-8"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"a": ' + b"1" * 5000 + b"}", "too many digits"),
    ],
)
def test_an_unreadable_json_body_is_the_documented_422(
    sqlite_api: Api, route: str, body: bytes, says: str
) -> None:
    caller = sqlite_api.tenant()
    response = caller.post(route, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()
    if route == "/v1/embeddings":  # OpenAI's error shape, the same facts
        error = error["error"]
        error = {"error": error["code"], "field": error["param"], "detail": error["message"],
                 "request_id": error["request_id"]}
    assert (error["error"], error["field"]) == ("validation_error", "body")
    assert says in error["detail"]
    assert error["request_id"] == response.headers["x-request-id"]
    documented = sqlite_api.app.openapi()["paths"][route]["post"]["responses"]
    assert "422" in documented and "400" not in documented


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/jobs", b'{"corpus_id": "crp_\\ud800"}'),
        ("/v1/jobs", b'{"corpus_id": "crp_\\u0000"}'),
        ("/v1/embed", b'{"model": "mdl_\\udc00", "inputs": ["wing"]}'),
        ("/v1/embed", b'{"model": "mdl_\\u0000", "inputs": ["wing"]}'),
    ],
)
def test_ids_holding_a_lone_surrogate_or_nul_are_422_on_both_databases(
    api: Api, route: str, body: bytes
) -> None:
    caller = api.tenant()
    response = caller.post(route, content=body, headers={"Content-Type": "application/json"})
    if response.status_code == 404:  # SQLite stores and compares NUL like any character
        assert b"u0000" in body and api.settings.database_url.startswith("sqlite")
        return
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error"


def test_eval_and_query_sets_go_with_their_deleted_corpus(api: Api) -> None:
    caller = api.tenant()
    corpus = caller.corpus(3)
    evs = caller.post("/v1/eval-sets", data={"corpus_id": corpus["id"]},
                      files={"queries": ("q.jsonl", queries_bytes(["q1"])),
                             "qrels": ("qrels.tsv", qrels_bytes([("q1", "d1", 1)]))}).json()
    qrs = caller.post("/v1/query-sets", data={"corpus_id": corpus["id"]},
                      files={"queries": ("q.jsonl", queries_bytes(["q1"]))}).json()
    assert caller.get(f"/v1/eval-sets/{evs['id']}").status_code == 200
    assert caller.delete(f"/v1/corpora/{corpus['id']}").status_code == 204
    for route, resource in (("/v1/eval-sets", evs), ("/v1/query-sets", qrs)):
        response = caller.get(f"{route}/{resource['id']}")
        assert response.status_code == 404, response.text
        assert caller.get(route).json() == {"data": [], "count": 0}
