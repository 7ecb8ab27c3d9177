"""Operations under strain, in the production configuration (PostgreSQL, S3 on nanio, the API
under uvicorn, a prefork Celery worker) with the broker on a private Redis server this module
starts on a free port, so it can be restarted under a running job without touching the shared
one:

- 32 concurrent clients on /v1/embed for a bounded time: every request answered, none failed;
- Redis restarted while a job trains: the job still succeeds;
- the worker's own log (a real process's output): JSON lines carrying the request id that
  created the job, its tenant, job and stage, and never the API key or corpus text.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.processes import (
    ManagedProcess,
    free_port,
    nanio_server,
    start_process,
    wait_until,
)
from tests.service_stack import (
    LONG_TRAINING,
    TINY_JOB,
    ServiceStack,
    create_job,
    postgres_database,
    production_env,
    stage_started,
    synthetic_corpus,
    upload_corpus,
    wait_for_event,
    wait_for_job,
)
from worker.artifacts import store_for

pytestmark = pytest.mark.slow

CLIENTS = 32
LOAD_SECONDS = 6.0
REQUESTS_PER_CLIENT = 40
REQUEST_ID = "req-ops-redis-restart-0001"


@dataclass
class RedisServer:
    """A private redis-server: restartable on its port, its data kept (append-only file) as a
    real deployment's would be across a restart."""

    port: int
    data_dir: Path
    log_dir: Path
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--dir", str(self.data_dir)]
        self.process = start_process(f"redis-{self.port}", argv, {}, self.log_dir)
        wait_until(lambda: redis.Redis.from_url(self.url).ping(), 20, self.process, "redis")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)  # SIGTERM: redis writes its data and exits
            self.process = None


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    root = tmp_path_factory.mktemp("redis")
    server = RedisServer(free_port(), root / "data", root / "logs")
    server.data_dir.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, private_redis: RedisServer, model_store: Path
) -> Iterator[ServiceStack]:
    root = tmp_path_factory.mktemp("ops")
    with nanio_server(root / "nanio", root / "logs") as nanio, postgres_database() as url:
        env = production_env(root, url, nanio, model_store, visibility=6)
        # The private Redis is the broker (and the rate limiter's store); no per-key limit, so
        # the load below measures the service, not the 429s of one key.
        env |= {"TAILOR_BROKER_URL": private_redis.url, "TAILOR_RATE_LIMIT_PER_SECOND": "0"}
        stack = ServiceStack(env, root)
        try:
            stack.migrate_and_create_tenant()
            stack.start_api()
            # A short lease: a stage the broker outage stopped is sent again within seconds;
            # a short retention sweep: a finished job's work folder goes within seconds.
            stack.start_worker("worker-ops", lease_ttl_s="4", retention_sweep_s="2")
            yield stack
        finally:
            stack.stop()


async def _drive(url: str, key: str) -> tuple[int, list[str]]:
    """CLIENTS clients, each sending /v1/embed requests one after another until LOAD_SECONDS
    have passed or it has sent REQUESTS_PER_CLIENT; returns (answered, errors)."""
    deadline = time.monotonic() + LOAD_SECONDS
    errors: list[str] = []
    answered = 0

    async def client(number: int) -> None:
        nonlocal answered
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits,
                                     headers={"Authorization": f"Bearer {key}"}) as http:
            for sent in range(REQUESTS_PER_CLIENT):
                if time.monotonic() > deadline:
                    return
                texts = [f"client {number} request {sent} wing pressure", "boundary layer"]
                try:
                    response = await http.post("/v1/embed", json={"model": "tiny-student",
                                                                  "inputs": texts})
                except httpx.HTTPError as error:
                    errors.append(f"{type(error).__name__}: {error}")
                    continue
                if response.status_code != 200 or len(response.json()["data"]) != 2:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                answered += 1

    await asyncio.gather(*(client(number) for number in range(CLIENTS)))
    return answered, errors


def test_32_concurrent_clients_on_embed_get_no_errors(stack: ServiceStack) -> None:
    # One request first, so the model's load is not what the clients measure.
    with stack.client() as client:
        warm = client.post("/v1/embed", json={"model": "tiny-student", "inputs": ["warm"]})
        assert warm.status_code == 200, warm.text
    started = time.monotonic()
    answered, errors = asyncio.run(_drive(stack.api_url, stack.api_key))
    elapsed = time.monotonic() - started
    print(f"{CLIENTS} clients: {answered} /v1/embed requests answered in {elapsed:.1f} s, "
          f"{len(errors)} errors")
    assert errors == [], errors[:5]
    assert answered >= CLIENTS  # every client got at least one answer
    assert elapsed < LOAD_SECONDS + 30, elapsed  # bounded: no client hung


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def job_across_a_redis_restart(
    stack: ServiceStack, private_redis: RedisServer, corpus: Path
) -> dict[str, Any]:
    """A job created with a known request id, the broker restarted while it trains; the job
    as it ended."""
    with stack.client() as client:
        corpus_id = upload_corpus(client, corpus)["id"]
        client.headers["X-Request-ID"] = REQUEST_ID
        job = create_job(client, corpus_id, **LONG_TRAINING)
        del client.headers["X-Request-ID"]
        wait_for_event(client, job["id"], stage_started("distill"), 180, stack)
        private_redis.stop()
        time.sleep(2)
        private_redis.start()
        return wait_for_job(client, job["id"], lambda j: j["status"] in
                            ("succeeded", "failed", "cancelled"), 300, stack)


def test_a_job_succeeds_across_a_redis_restart(
    stack: ServiceStack, job_across_a_redis_restart: dict
) -> None:
    job = job_across_a_redis_restart
    assert job["status"] == "succeeded", job
    assert job["model_id"]
    # The worker's retention sweep then removes the job's work folder (its outputs are stored).
    work = Path(stack.env["TAILOR_WORK_DIR"]) / job["id"]
    wait_until(lambda: not work.exists(), 30, stack.workers[0], "the work folder to go")


def test_the_worker_logs_json_lines_with_the_request_that_created_the_job(
    stack: ServiceStack, job_across_a_redis_restart: dict, corpus: Path
) -> None:
    job = job_across_a_redis_restart
    log = stack.workers[0].log_path.read_text(errors="replace")
    about_job = [line for line in log.splitlines() if job["id"] in line]
    assert about_job, stack.diagnostics()
    entries = [json.loads(line) for line in about_job]  # every line about it is JSON
    tagged = [e for e in entries if e.get("job_id") == job["id"]]
    assert {e["request_id"] for e in tagged} == {REQUEST_ID}
    assert {e["tenant_id"] for e in tagged} == {_tenant_of_request(stack, REQUEST_ID)}
    stages = {e["stage"] for e in tagged}
    assert {"prepare", "distill", "evaluate"} <= stages, stages
    assert all(e.get("task_id") for e in tagged)
    # Never the key, never corpus text.
    assert stack.api_key not in log
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert not [text for text in texts if text in log]


def _tenant_of_request(stack: ServiceStack, request_id: str) -> str:
    """The tenant the API's own log line of request `request_id` names."""
    assert stack.api is not None
    for line in stack.api.log_path.read_text(errors="replace").splitlines():
        if request_id in line:
            entry = json.loads(line)
            if entry.get("request_id") == request_id and entry.get("tenant_id"):
                return str(entry["tenant_id"])
    raise AssertionError(f"the API logged no line for {request_id}")


def test_the_client_names_filters_and_deletes(stack: ServiceStack, corpus: Path) -> None:
    from tailor_client import Client, ConflictError, NotFoundError

    client = Client(stack.api_url, api_key=stack.api_key)
    corpus_id = client.corpora.upload(corpus)["id"]
    job = client.jobs.create(corpus_id, **TINY_JOB, name="ops", metadata={"team": "ops"})
    assert (job["name"], job["metadata"]) == ("ops", {"team": "ops"})
    found = client.jobs.filter(metadata={"team": "ops"}, name="ops")
    assert [row["id"] for row in found["data"]] == [job["id"]]
    assert client.jobs.update(job["id"], metadata={"team": "search"})["metadata"] == {
        "team": "search"}
    with pytest.raises(ConflictError) as refused:
        client.corpora.delete(corpus_id)
    assert refused.value.context["job_ids"] == [job["id"]]
    client.corpora.delete(corpus_id, cascade=True)
    client.jobs.delete(job["id"])
    with pytest.raises(NotFoundError):
        client.jobs.get(job["id"])


def test_a_running_job_deleted_stops_and_its_objects_and_work_folder_go(
    stack: ServiceStack, corpus: Path
) -> None:
    store = store_for(stack.settings())
    with stack.client() as client:
        corpus_id = upload_corpus(client, corpus)["id"]
        job = create_job(client, corpus_id, **LONG_TRAINING)
        wait_for_event(client, job["id"], stage_started("distill"), 180, stack)
        assert store.list(f"jobs/{job['id']}/")  # prepare, generate and filter are stored
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    # The worker stops the stage at its next progress check and records the cancel; its
    # retention sweep (every 2 s here) then removes what the job left, in the store and on disk.
    work = Path(stack.env["TAILOR_WORK_DIR"]) / job["id"]
    wait_until(lambda: not store.list(f"jobs/{job['id']}/") and not work.exists(), 90,
               stack.workers[0], "the deleted job's objects and work folder to go")
