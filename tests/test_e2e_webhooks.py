"""Webhooks and metrics end to end: the API under uvicorn and a prefork Celery worker as real
processes on PostgreSQL, Redis and S3 (nanio); a real HTTP receiver in the test process that
verifies every signature with the `standardwebhooks` library; Prometheus scrapes of the API's
/metrics and the worker's metrics port."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import free_port, nanio_server
from tests.service_stack import (
    TINY_JOB,
    ServiceStack,
    flush_redis,
    postgres_database,
    production_env,
    synthetic_corpus,
    upload_corpus,
)
from tests.webhook_receiver import Receiver, webhook_receiver

pytestmark = pytest.mark.slow

METRICS_TOKEN = "scrape-token-for-tests"
ATTEMPTS = 3


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as server:
        yield server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[ServiceStack]:
    root = tmp_path_factory.mktemp("webhooks")
    flush_redis()
    with nanio_server(root / "nanio", root / "logs") as nanio, \
            postgres_database() as database_url:
        env = {
            **production_env(root, database_url, nanio, model_store, 30),
            # The receiver listens on loopback, which production refuses.
            "TAILOR_WEBHOOK_ALLOW_LOOPBACK": "true",
            "TAILOR_WEBHOOK_MAX_ATTEMPTS": str(ATTEMPTS),
            "TAILOR_WEBHOOK_BACKOFF_BASE_S": "0.5",
            "TAILOR_WEBHOOK_TIMEOUT_S": "5",
            "TAILOR_METRICS_TOKEN": METRICS_TOKEN,
            "TAILOR_WORKER_METRICS_PORT": str(free_port()),
        }
        stack = ServiceStack(env, root)
        try:
            stack.migrate_and_create_tenant()
            stack.start_api()
            stack.start_worker("worker-webhooks")
            yield stack
        finally:
            stack.stop()
            flush_redis()


@pytest.fixture(scope="module")
def corpus_id(stack: ServiceStack, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = synthetic_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", documents=30)
    with stack.client() as client:
        return str(upload_corpus(client, path)["id"])


def register(client: httpx.Client, receiver: Receiver, path: str, events: list[str],
             plan: list[int] | None = None) -> dict[str, Any]:
    response = client.post("/v1/webhooks", json={"url": receiver.url + path, "events": events,
                                                 "description": path})
    assert response.status_code == 201, response.text
    endpoint = response.json()
    assert endpoint["secret"].startswith("whsec_")
    receiver.secrets[path] = endpoint["secret"]
    receiver.plans[path] = list(plan or [])
    return endpoint


def deliveries(client: httpx.Client, endpoint_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/webhooks/{endpoint_id}/deliveries", params={"limit": 100})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def wait_for_delivery(client: httpx.Client, endpoint_id: str, status: str, timeout: float,
                      stack: ServiceStack) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = deliveries(client, endpoint_id)
        if found and found[0]["status"] == status:
            return found[0]
        time.sleep(0.3)
    raise AssertionError(f"no {status} delivery: {found}\n{stack.diagnostics()}")


def wait_for_status(client: httpx.Client, url: str, status: str, timeout: float,
                    stack: ServiceStack) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(url).json()
        if body["status"] == status:
            return body
        time.sleep(0.3)
    raise AssertionError(f"{url} is {body.get('status')}, not {status}\n{stack.diagnostics()}")


def bulk_embedding(client: httpx.Client, corpus_id: str, stack: ServiceStack) -> str:
    created = client.post("/v1/embedding-jobs", json={"model": "tiny-student",
                                                      "corpus_id": corpus_id})
    assert created.status_code == 201, created.text
    job_id = str(created.json()["id"])
    wait_for_status(client, f"/v1/embedding-jobs/{job_id}", "succeeded", 120, stack)
    return job_id


def is_event(kind: str, job_id: str) -> Any:
    return lambda r: r.payload["type"] == kind and r.payload["data"]["id"] == job_id


def test_events_are_signed_retried_logged_and_redelivered(
    stack: ServiceStack, receiver: Receiver, corpus_id: str
) -> None:
    with stack.client() as client:
        everything = register(client, receiver, "/all", [
            "job.succeeded", "job.failed", "job.cancelled", "job.stage_completed"])
        flaky = register(client, receiver, "/flaky", ["job.succeeded"], plan=[500, 500])
        down = register(client, receiver, "/down", ["job.succeeded"], plan=[503] * ATTEMPTS)

        job_id = bulk_embedding(client, corpus_id, stack)

        # Finished on the worker, signed with the endpoint's own secret, verified by the receiver.
        done = receiver.wait_for("/all", is_event("job.succeeded", job_id), 60,
                                 stack.diagnostics)
        assert done.verified and done.answered == 200
        data = done.payload["data"]
        assert data["object"] == "embedding_job" and data["status"] == "succeeded"
        assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(done.headers)
        assert done.headers["webhook-signature"].startswith("v1,")

        # A receiver that fails twice is retried, with backoff, until it answers 200.
        flaky_done = wait_for_delivery(client, flaky["id"], "succeeded", 60, stack)
        assert [a["status_code"] for a in flaky_done["attempt_log"]] == [500, 500, 200]
        assert flaky_done["attempts"] == 3 and flaky_done["next_attempt_at"] is None
        assert all(a["latency_ms"] >= 0 for a in flaky_done["attempt_log"])
        assert flaky_done["attempt_log"][0]["error"].startswith("HTTP 500")
        requests = receiver.at("/flaky")
        assert [r.answered for r in requests] == [500, 500, 200]
        assert {r.headers["webhook-id"] for r in requests} == {flaky_done["message_id"]}
        gaps = [b - a for a, b in zip(_times(flaky_done), _times(flaky_done)[1:], strict=False)]
        assert gaps[1] > gaps[0] * 1.5, gaps  # exponential: 0.5 s, then 1 s

        # One that never answers well gets the bounded number of attempts, then fails...
        failed = wait_for_delivery(client, down["id"], "failed", 60, stack)
        assert failed["attempts"] == ATTEMPTS and failed["next_attempt_at"] is None
        assert [a["status_code"] for a in failed["attempt_log"]] == [503] * ATTEMPTS
        assert len(receiver.at("/down")) == ATTEMPTS

        # ...and is sent again on request once it is back: same message id, fresh signature.
        again = client.post(f"/v1/webhooks/{down['id']}/deliveries/{failed['id']}/redeliver")
        assert again.status_code == 202, again.text
        assert again.json()["status"] == "pending"
        redelivered = wait_for_delivery(client, down["id"], "succeeded", 60, stack)
        assert redelivered["id"] == failed["id"] and redelivered["attempts"] == ATTEMPTS + 1
        last = receiver.at("/down")[-1]
        assert last.verified and last.answered == 200
        assert last.headers["webhook-id"] == failed["message_id"]

        # A disabled endpoint is sent nothing.
        assert client.patch(f"/v1/webhooks/{everything['id']}",
                            json={"enabled": False}).status_code == 200
        before = len(receiver.at("/all"))
        second = bulk_embedding(client, corpus_id, stack)
        receiver.wait_for("/flaky", is_event("job.succeeded", second), 60, stack.diagnostics)
        assert len(receiver.at("/all")) == before
        assert client.patch(f"/v1/webhooks/{everything['id']}",
                            json={"enabled": True}).status_code == 200


def _times(delivery: dict[str, Any]) -> list[float]:
    from datetime import datetime

    return [datetime.fromisoformat(a["at"]).timestamp() for a in delivery["attempt_log"]]


def test_a_training_job_announces_its_stages_and_its_cancel(
    stack: ServiceStack, receiver: Receiver, corpus_id: str
) -> None:
    with stack.client() as client:
        register(client, receiver, "/training", ["job.stage_completed", "job.cancelled"])
        created = client.post("/v1/jobs", json={"corpus_id": corpus_id, **TINY_JOB})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        stage = receiver.wait_for("/training", is_event("job.stage_completed", job_id), 120,
                                  stack.diagnostics)
        assert stage.verified
        assert stage.payload["data"]["completed_stage"] == "prepare"
        assert stage.payload["data"]["object"] == "job"
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
        cancelled = receiver.wait_for("/training", is_event("job.cancelled", job_id), 120,
                                      stack.diagnostics)
        assert cancelled.verified and cancelled.payload["data"]["status"] == "cancelled"


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    response = httpx.get(url, headers=headers or {}, timeout=30)
    assert response.status_code == 200, response.text
    samples: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def test_the_api_and_the_worker_expose_metrics_that_move(
    stack: ServiceStack, receiver: Receiver, corpus_id: str
) -> None:
    api_metrics = stack.api_url + "/metrics"
    assert httpx.get(api_metrics).status_code == 401
    assert httpx.get(api_metrics, headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    worker_metrics = f"http://127.0.0.1:{stack.env['TAILOR_WORKER_METRICS_PORT']}/metrics"

    api_before, worker_before = scrape(api_metrics, auth), scrape(worker_metrics)
    with stack.client() as client:
        hook = register(client, receiver, "/metrics-hook", ["job.succeeded"])
        for _ in range(2):
            assert client.get(f"/v1/webhooks/{hook['id']}").status_code == 200
        for texts in (["wing flutter"], ["heat transfer", "boundary layer"]):
            response = client.post("/v1/embed", json={"model": "tiny-student", "inputs": texts})
            assert response.status_code == 200, response.text
        job_id = bulk_embedding(client, corpus_id, stack)
        wait_for_delivery(client, hook["id"], "succeeded", 60, stack)
    api_after, worker_after = scrape(api_metrics, auth), scrape(worker_metrics)

    route = {"method": "GET", "route": "/v1/webhooks/{webhook_id}", "status": "200"}
    count = "tailor_http_request_duration_seconds_count"
    assert value(api_after, count, **route) - value(api_before, count, **route) == 2
    assert value(api_after, count, method="POST", route="/v1/embed", status="200") >= 2
    batches = "tailor_embed_batch_inputs_count"
    assert value(api_after, batches) - value(api_before, batches) >= 2
    rows = "tailor_embed_batch_inputs_sum"
    assert value(api_after, rows) - value(api_before, rows) == 3
    cache = "tailor_embed_model_cache_total"
    assert (total(api_after, cache) - total(api_before, cache)) == 2
    assert value(api_after, cache, result="hit") > value(api_before, cache, result="hit")

    stages = "tailor_stage_duration_seconds_count"
    embed = {"stage": "embed", "outcome": "succeeded"}
    assert value(worker_after, stages, **embed) - value(worker_before, stages, **embed) == 1
    jobs = {"kind": "embedding", "status": "succeeded"}
    assert value(worker_after, "tailor_jobs", **jobs) - value(
        worker_before, "tailor_jobs", **jobs) == 1
    delivered = "tailor_webhook_deliveries_total"
    assert value(worker_after, delivered, outcome="succeeded") > value(
        worker_before, delivered, outcome="succeeded")
    for queue in ("cpu", "gpu", "webhooks"):
        assert ("tailor_queue_depth", (("queue", queue),)) in worker_after
    assert job_id
