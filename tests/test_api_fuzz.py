"""Property-based fuzzing of the API against its own OpenAPI document (schemathesis).

Every operation but job creation (which would start training) gets generated requests, valid
and invalid, sent to the real app on PostgreSQL with a real tenant key, so authenticated routes
are reached past their 401. Any 500, any status the document does not list, any response whose
body, content type or headers contradict the document, fails. Bounded: a fixed number of
examples per operation, no shrinking deadline, derandomized so a failure reproduces.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.transport.asgi import ASGI_TRANSPORT

from app.openapi import openapi_document
from tests.api_support import Api, Caller, start_api

pytest_plugins = ["tests.api_fixtures"]

EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzzed(
    tmp_path_factory: pytest.TempPathFactory, postgresql_url: str, model_store: Path,
    broker_dir: Path,
) -> Iterator[tuple[Api, Caller]]:
    """The app on PostgreSQL (which refuses more than SQLite does), a tenant with a corpus,
    and generous limits so that the fuzzer meets the routes, not the rate limiter."""
    for api in start_api(
        tmp_path_factory.mktemp("fuzz"), postgresql_url, model_store,
        rate_limit_per_second=0, auth_failure_burst=10_000,
    ):
        caller = api.tenant("fuzz")
        caller.corpus(3)
        yield api, caller


# The document as the app serves it (tests/test_openapi.py keeps openapi.yaml equal to it). Job
# creation starts training on a worker: it is left out; the job routes that read are fuzzed.
schema = schemathesis.openapi.from_dict(openapi_document()).exclude(method="POST", path="/v1/jobs")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_breaks_the_api_or_its_document(
    case: Any, fuzzed: tuple[Api, Caller]
) -> None:
    api, caller = fuzzed
    if "Authorization" not in (case.headers or {}):
        case.headers = {**(case.headers or {}), **caller.headers}
    response = ASGI_TRANSPORT.send(case, app=api.app)  # in-process, to the fixture's app
    case.validate_response(response, checks=CHECKS)
