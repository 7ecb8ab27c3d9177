"""The embedding routes' shortcut (app.embeddings.shortcut) over real HTTP: a request it answers
gets byte for byte the response FastAPI's route gives the same request, and a request it does
not take goes on to the route with its body intact."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from app.embeddings.shortcut import EmbeddingShortcut
from tests.api_support import Api

pytest_plugins = ["tests.api_fixtures"]

SHORTCUT = "application/json"
# FastAPI reads this as JSON too; the shortcut leaves it to the route.
ROUTE = "application/json; charset=utf-8"
LONG = "boundary layer transition on a swept wing at high mach numbers " * 30
# Headers that differ between two requests of one key: its bucket has one token less.
VARYING = {"x-ratelimit-remaining", "x-ratelimit-reset"}


def _shortcut(api: Api) -> EmbeddingShortcut:
    layer: Any = api.app.middleware_stack
    while not isinstance(layer, EmbeddingShortcut):
        layer = layer.app
    return layer


def _both_ways(served: str, path: str, body: dict[str, Any], key: str | None,
               request_id: str) -> tuple[httpx.Response, httpx.Response]:
    """The same request through the shortcut and through the route."""
    raw = httpx.Request("POST", "/", json=body).content
    answers = []
    for content_type in (SHORTCUT, ROUTE):
        headers = {"Content-Type": content_type, "X-Request-ID": request_id}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        answers.append(httpx.post(served + path, content=raw, headers=headers, timeout=60))
    return answers[0], answers[1]


CASES: list[tuple[str, dict[str, Any], int]] = [
    ("/v1/embed", {"model": "tiny-student", "inputs": ["wing", "heat flux on a cone"]}, 200),
    ("/v1/embed", {"model": "tiny-student", "inputs": ["wing"], "input_type": "query",
                   "dimensions": 32, "truncate": True}, 200),
    ("/v1/embed", {"model": "tiny-student", "inputs": ["short", LONG]}, 200),
    # Values the schema coerces, as the route's validation does.
    ("/v1/embed", {"model": "tiny-student", "inputs": ["wing"], "dimensions": 32.0,
                   "truncate": "true"}, 200),
    ("/v1/embeddings", {"model": "tiny-student", "input": "wing"}, 200),
    ("/v1/embeddings", {"model": "tiny-student:query", "input": ["wing", "cone"],
                        "encoding_format": "base64", "user": "u1", "ignored": 1}, 200),
    ("/v1/embeddings", {"model": "tiny-student", "input": [[86, 8714], [71, 266]]}, 200),
    # Errors raised past validation: by the handler, the model lookup, the key check.
    ("/v1/embed", {"model": "tiny-student", "inputs": ["short", LONG], "truncate": False}, 422),
    ("/v1/embeddings", {"model": "tiny-student", "input": [LONG], "truncate": False}, 422),
    ("/v1/embed", {"model": "tiny-student", "inputs": ["x"], "dimensions": 8}, 422),
    ("/v1/embeddings", {"model": "tiny-student", "input": "x", "dimensions": 8}, 422),
    ("/v1/embed", {"model": "no-such-model", "inputs": ["x"]}, 404),
    ("/v1/embeddings", {"model": "no-such-model", "input": "x"}, 404),
    ("/v1/embed", {"model": "tiny-student", "inputs": ["x"] * 2049}, 422),
]


@pytest.mark.parametrize(("path", "body", "status"), CASES)
def test_the_shortcut_answers_as_the_route_does(
    sqlite_api: Api, served: str, path: str, body: dict[str, Any], status: int
) -> None:
    key = sqlite_api.tenant().key
    shortcut = _shortcut(sqlite_api)
    before = shortcut.answered
    fast, routed = _both_ways(served, path, body, key, "req-same-id")
    assert shortcut.answered == before + 1  # the first, not the second
    assert fast.status_code == routed.status_code == status, fast.text
    assert fast.content == routed.content
    fast_headers = {k: v for k, v in fast.headers.items() if k not in VARYING | {"date"}}
    routed_headers = {k: v for k, v in routed.headers.items() if k not in VARYING | {"date"}}
    assert fast_headers == routed_headers
    assert fast.headers["x-request-id"] == "req-same-id"
    assert "x-ratelimit-remaining" in fast.headers


@pytest.mark.parametrize("key", [None, "tlr_not-a-key", "not even a key"])
def test_refused_keys_get_the_routes_errors(sqlite_api: Api, served: str,
                                            key: str | None) -> None:
    for path, body in (("/v1/embed", {"model": "tiny-student", "inputs": ["x"]}),
                       ("/v1/embeddings", {"model": "tiny-student", "input": "x"})):
        fast, routed = _both_ways(served, path, body, key, "req-refused")
        assert fast.status_code == routed.status_code == 401
        assert fast.content == routed.content
        assert fast.headers["www-authenticate"] == routed.headers["www-authenticate"]


@pytest.mark.parametrize(
    ("path", "raw", "field"),
    [
        ("/v1/embed", b'{"model": "tiny-student", "inputs": []}', "inputs"),
        ("/v1/embed", b'{"model": "tiny-student", "inputs": ["x"], "extra": 1}', "extra"),
        ("/v1/embed", b'{"model": "tiny-student", "inputs": ["x"], "truncate": "maybe"}',
         "truncate"),
        ("/v1/embed", b'{"model": "tiny-student", "inputs": ["x"', "40"),  # the offset
        ("/v1/embeddings", b'{"model": "tiny-student", "input": ["ok", ""]}', "input"),
        ("/v1/embeddings", b'{"model": "tiny-student", "input": "x", "dimensions": NaN}',
         "dimensions"),
    ],
)
def test_bodies_the_schema_refuses_go_on_to_the_route_intact(
    sqlite_api: Api, served: str, path: str, raw: bytes, field: str
) -> None:
    caller = sqlite_api.tenant()
    shortcut = _shortcut(sqlite_api)
    before = shortcut.answered
    response = httpx.post(served + path, content=raw, timeout=60,
                          headers={**caller.headers, "Content-Type": SHORTCUT})
    assert response.status_code == 422, response.text
    assert shortcut.answered == before
    error = response.json()
    param = error["error"]["param"] if path == "/v1/embeddings" else error["field"]
    assert param == field or param.startswith(f"{field}."), error



def _requests_counted(served: str, route: str) -> float:
    metrics = httpx.get(f"{served}/metrics", timeout=30).text
    prefix = f'tailor_http_request_duration_seconds_count{{method="POST",route="{route}",'
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(prefix) and 'status="200"' in line)


def test_the_shortcut_logs_and_counts_a_request_as_the_route_does(
    sqlite_api: Api, served: str, capfd: pytest.CaptureFixture[str]
) -> None:
    caller = sqlite_api.tenant()
    before = _requests_counted(served, "/v1/embeddings")
    fast, routed = _both_ways(served, "/v1/embeddings", {"model": "tiny-student", "input": "x"},
                              caller.key, "req-logged")
    assert fast.status_code == routed.status_code == 200
    assert _requests_counted(served, "/v1/embeddings") == before + 2
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()
             if line.startswith("{") and '"req-logged"' in line]
    assert len(lines) == 2
    for line in lines:
        assert (line["route"], line["status"], line["tenant_id"]) == (
            "/v1/embeddings", 200, caller.tenant_id)
        assert line["key_id"].startswith("key_")
    assert lines[0].keys() == lines[1].keys()
