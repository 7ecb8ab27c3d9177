"""The deployment's generation backend (Settings.generation_backend): every job's queries are
written where the operator says, an OpenAI-compatible endpoint's model included."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings
from ml_core.config import RecipeConfig
from ml_core.pipeline import StageContext, run_stage
from ml_core.records import Query, read_jsonl
from ml_core.registry import ModelRegistry
from tests.api_support import Api, job_body, start_api
from tests.http_servers import JsonHandler, serving

pytest_plugins = ["tests.api_fixtures"]

DEMO = Path(__file__).resolve().parents[1] / "demo" / "cranfield"
SERVED = "served-llm"


class _Endpoint(JsonHandler):
    """An OpenAI-compatible chat endpoint that writes a short query from the passage it is
    shown (the last user message), and records what it was sent."""

    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.read_json()
        words = [w.strip(".,;:()") for w in body["messages"][-1]["content"].split()]
        long_words = [w.lower() for w in words if len(w) > 6][:3]
        reply = "what is known about " + " ".join(long_words or ["this"])
        self.send_json(200, {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                  "content": reply}}]})


@pytest.fixture()
def endpoint() -> Iterator[str]:
    _Endpoint.requests = []
    with serving(_Endpoint) as url:
        yield url + "/v1"


@contextlib.contextmanager
def _api(tmp_path: Path, sqlite_url: str, model_store: Path, **settings: object) -> Iterator[Api]:
    yield from start_api(tmp_path, sqlite_url, model_store, **settings)


def _without_generator(corpus_id: str, **fields: object) -> dict:
    body = job_body(corpus_id, **fields)
    body.pop("generator")
    return body


def test_openai_deployment_without_its_endpoint_or_model_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="TAILOR_GENERATION_ENDPOINT and "
                                              "TAILOR_GENERATION_MODEL"):
        Settings(generation_backend="openai")
    with pytest.raises(ValidationError, match="needs TAILOR_GENERATION_MODEL"):
        Settings(generation_backend="openai", generation_endpoint="http://llm.internal/v1")


def test_an_openai_deployment_writes_every_jobs_queries_at_its_endpoint(
    tmp_path: Path, sqlite_url: str, model_store: Path, broker_dir: Path, endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    del broker_dir  # the fixture exports the broker the API enqueues to
    with _api(tmp_path, sqlite_url, model_store, generation_backend="openai",
              generation_endpoint=endpoint, generation_model=SERVED) as api:
        caller = api.tenant()
        corpus = caller.corpus()
        response = caller.post("/v1/jobs", json=_without_generator(corpus["id"]))
        assert response.status_code == 201, response.text
        recipe = response.json()["recipe"]
        assert recipe["generator"] == SERVED  # not a stored model: the endpoint's
        assert recipe["generation"]["backend"] == "openai"
        assert recipe["generation"]["endpoint"] == endpoint
        # A tenant may name the served model, no other, and still never the endpoint.
        named = caller.post("/v1/jobs", json=job_body(corpus["id"], generator=SERVED))
        assert named.status_code == 201, named.text
        other = caller.post("/v1/jobs", json=job_body(corpus["id"]))  # tiny-generator
        assert other.status_code == 422
        assert other.json()["field"] == "generator" and SERVED in other.json()["detail"]
        moved = caller.post("/v1/jobs", json=_without_generator(
            corpus["id"], hyperparameters={"generation": {"endpoint": "http://elsewhere/v1"}}))
        assert moved.status_code == 422
        assert moved.json()["field"] == "hyperparameters.generation.endpoint"

    # The job's own recipe, run as the worker runs it: the queries come from the endpoint.
    monkeypatch.setenv("TAILOR_GENERATOR_API_KEY", "operator-key")
    recipe["generation"].update(passages=6, query_types=recipe["generation"]["query_types"][:1])
    config = RecipeConfig.model_validate(recipe)
    ctx = StageContext(tmp_path / "job", DEMO / "corpus.jsonl", config,
                       ModelRegistry(model_store))
    run_stage("prepare", ctx)
    run_stage("generate", ctx)
    queries = list(read_jsonl(tmp_path / "job" / "generate" / "queries.jsonl", Query))
    assert len(queries) == 6
    assert all(q.text.startswith("what is known about") for q in queries)
    sent = _Endpoint.requests
    assert len(sent) == 6 and {r["path"] for r in sent} == {"/v1/chat/completions"}
    assert {r["body"]["model"] for r in sent} == {SERVED}
    assert {r["auth"] for r in sent} == {"Bearer operator-key"}


def test_a_vllm_deployment_runs_each_jobs_stored_generator_on_vllm(
    tmp_path: Path, sqlite_url: str, model_store: Path, broker_dir: Path,
) -> None:
    del broker_dir
    with _api(tmp_path, sqlite_url, model_store, generation_backend="vllm") as api:
        caller = api.tenant()
        corpus = caller.corpus()
        job = caller.job(corpus["id"])
        assert job["recipe"]["generation"]["backend"] == "vllm"
        assert job["recipe"]["generator"] == "tiny-generator"
        assert job["recipe"]["generation"]["endpoint"] is None
        # The generator is still a stored model the registry must hold.
        unknown = caller.post("/v1/jobs", json=job_body(corpus["id"], generator="no-such-llm"))
        assert unknown.status_code == 422 and unknown.json()["field"] == "generator"


def test_without_a_deployment_backend_jobs_generate_in_process(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    job = caller.job(caller.corpus()["id"])
    assert job["recipe"]["generation"]["backend"] == "transformers"
    assert job["recipe"]["generator"] == "tiny-generator"
