"""The whole service as real processes, for the end-to-end tests.

`production_env` points every component at PostgreSQL (a fresh database, migrated with Alembic),
Redis db 15 and a nanio S3 server; `embedded_env` at the zero-set-up default (SQLite, a local
object folder, kombu's filesystem broker). `ServiceStack` then runs the API (uvicorn) and Celery
workers as subprocesses and talks to them over HTTP like a customer would.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.settings import Settings
from tests.processes import (
    BIN,
    REPO,
    ManagedProcess,
    NanioServer,
    free_port,
    nanio_server,
    start_process,
    wait_for_log,
    wait_until,
)
from tests.tiny_models import TINY_HYPERPARAMETERS
from worker.celery_app import WORKER_ARGS

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_TEST_URL = "redis://127.0.0.1:6379/15"
# This test run's broker keys: concurrent runs (two checkouts, CI beside a developer) share the
# Redis database but never each other's tasks.
REDIS_TEST_PREFIX = f"tailor-test-{os.getpid()}-{random.randrange(16**6):06x}:"

# Tiny models and tiny hyperparameters: a whole job takes seconds of compute.
TINY_JOB: dict[str, Any] = {
    "base_model": "tiny-student",
    "teacher": "tiny-teacher",
    "generator": "tiny-generator",
    "query_types": ["questions", "keywords"],
    "passages": 30,
    "hyperparameters": TINY_HYPERPARAMETERS,
}


def synthetic_corpus(path: Path, documents: int = 60, seed: int = 7) -> Path:
    """A BEIR corpus of short science-ish documents made of the tiny tokenizer's words."""
    from tests.tiny_models import SCIENCE_WORDS, WORDS

    rng = random.Random(seed)
    science = SCIENCE_WORDS.split()
    common = [w for w in WORDS.split() if w.isalpha() and len(w) > 2]
    with path.open("w", encoding="utf-8") as out:
        for i in range(documents):
            topic = rng.sample(science, 4)
            sentences = []
            for _ in range(3):
                words = topic + rng.sample(science, 3) + rng.sample(common, 5)
                rng.shuffle(words)
                sentences.append(" ".join(words) + ".")
            doc = {"_id": f"d{i:03d}", "title": " ".join(topic[:2]), "text": " ".join(sentences)}
            out.write(json.dumps(doc) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Environments


@contextmanager
def postgres_database(prefix: str = "tailor_e2e") -> Iterator[str]:
    """A fresh, empty PostgreSQL database; dropped afterwards. Yields its SQLAlchemy URL."""
    import psycopg

    name = f"{prefix}_{int(time.time())}_{random.randrange(16**6):06x}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_redis(url: str = REDIS_TEST_URL, prefix: str = REDIS_TEST_PREFIX) -> None:
    """Delete this test run's broker keys (and only those) from the test Redis database."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def production_env(
    root: Path, database_url: str, nanio: NanioServer, model_store: Path, visibility: int
) -> dict[str, str]:
    """Settings for PostgreSQL + Redis + S3, as in production (short visibility timeout)."""
    return {
        **_common_env(root, model_store),
        "TAILOR_DATABASE_URL": database_url,
        "TAILOR_BROKER_URL": REDIS_TEST_URL,
        "TAILOR_BROKER_KEY_PREFIX": REDIS_TEST_PREFIX,
        "TAILOR_VISIBILITY_TIMEOUT": str(visibility),
        "TAILOR_OBJECT_STORE_URL": f"s3://tailor-e2e-{random.randrange(16**6):06x}",
        "TAILOR_S3_ENDPOINT_URL": nanio.endpoint_url,
        "TAILOR_S3_REGION": nanio.region,
        "TAILOR_S3_CREATE_BUCKET": "true",
        "TAILOR_AWS_ACCESS_KEY_ID": nanio.access_key,
        "TAILOR_AWS_SECRET_ACCESS_KEY": nanio.secret_key,
    }


def embedded_env(root: Path, model_store: Path) -> dict[str, str]:
    """Settings for the embedded default: SQLite, a local object folder, the filesystem broker."""
    return {
        **_common_env(root, model_store),
        "TAILOR_DATABASE_URL": f"sqlite:///{root / 'tailor.db'}",
        "TAILOR_BROKER_URL": "filesystem://",
        "TAILOR_BROKER_DIR": str(root / "broker"),
        "TAILOR_OBJECT_STORE_URL": f"file://{root / 'objects'}",
    }


def _common_env(root: Path, model_store: Path) -> dict[str, str]:
    return {
        "TAILOR_MODEL_STORE": str(model_store),
        "TAILOR_WORK_DIR": str(root / "work"),
        "TAILOR_EMBED_CACHE_DIR": str(root / "embed-cache"),
        "TAILOR_UPLOAD_DIR": str(root / "uploads"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Two shared cores: one thread per process keeps the API and the worker from fighting.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


# ---------------------------------------------------------------------------------------------
# The stack


@dataclass
class ServiceStack:
    """The API server and Celery workers of one environment, plus an API key."""

    env: dict[str, str]
    root: Path
    api: ManagedProcess | None = None
    api_url: str = ""
    api_key: str = ""
    workers: list[ManagedProcess] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def run_cli(self, *args: str) -> str:
        """Run `python -m app.cli ...` with this stack's settings; returns stdout."""
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            cwd=REPO,
            env={**_os_env(), **self.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"app.cli {args} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def migrate_and_create_tenant(self) -> None:
        self.run_cli("migrate")
        out = self.run_cli("create-tenant", "e2e")
        match = re.search(r"api_key:\s*(\S+)", out)
        assert match, out
        self.api_key = match.group(1)

    def start_api(self) -> None:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.api = start_process(
            "api",
            [
                str(BIN / "python"),
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            self.env,
            self.logs,
        )
        wait_until(
            lambda: httpx.get(self.api_url + "/healthz").status_code == 200, 60, self.api, "the API"
        )

    def start_worker(
        self, name: str = "worker", work_dir: Path | None = None, **settings: str
    ) -> ManagedProcess:
        """A Celery worker exactly as deployed: prefork, one process, both queues. A separate
        `work_dir` makes it another host: it shares only the database, broker and object store.
        `settings` override TAILOR_* settings for this worker (e.g. progress_interval_s="60")."""
        env = {**self.env, **{f"TAILOR_{k.upper()}": v for k, v in settings.items()}}
        if work_dir:
            env["TAILOR_WORK_DIR"] = str(work_dir)
        worker = start_process(
            name,
            [
                str(BIN / "celery"),
                *WORKER_ARGS,
                "-n",
                f"{name}-{random.randrange(16**6):06x}@%h",
            ],
            env,
            self.logs,
        )
        self.workers.append(worker)
        wait_for_log(worker, " ready.", 90)
        return worker

    def stop(self) -> None:
        # Tests need no graceful drain: a short grace period, then the group is killed.
        for process in [*self.workers, *([self.api] if self.api else [])]:
            process.stop(timeout=3)

    def settings(self) -> Settings:
        """This stack's TAILOR_* environment as Settings (e.g. to open its object store)."""
        prefix = "TAILOR_"
        return Settings(
            **{k[len(prefix) :].lower(): v for k, v in self.env.items() if k.startswith(prefix)}
        )

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=60,
        )

    def diagnostics(self) -> str:
        """Log tails of every process, for failure messages."""
        parts = [f"--- {p.name} ---\n{p.log_tail(6000)}" for p in [*self.workers, self.api] if p]
        return "\n".join(parts)


@contextmanager
def running_stack(
    environment: str, root: Path, model_store: Path, visibility: int = 30,
    settings: dict[str, str] | None = None,
) -> Iterator[ServiceStack]:
    """A migrated stack with a tenant, the API and one worker, in the "embedded" or the
    "production" environment (its own nanio server, database and broker keys, all gone after);
    `settings` adds TAILOR_* variables to every process's environment."""
    with ExitStack() as resources:
        if environment == "embedded":
            env = embedded_env(root, model_store)
        else:
            nanio = resources.enter_context(nanio_server(root / "nanio", root / "logs"))
            flush_redis()
            resources.callback(flush_redis)
            database_url = resources.enter_context(postgres_database())
            env = production_env(root, database_url, nanio, model_store, visibility)
        stack = ServiceStack({**env, **(settings or {})}, root)
        resources.callback(stack.stop)
        stack.migrate_and_create_tenant()
        stack.start_api()
        stack.start_worker(f"worker-{environment}")
        yield stack


def _os_env() -> dict[str, str]:
    import os

    return dict(os.environ)


# ---------------------------------------------------------------------------------------------
# Customer-side helpers


def upload_corpus(client: httpx.Client, path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        response = client.post(
            "/v1/corpora",
            files={"file": (path.name, handle, "application/jsonl")},
            data={"name": "e2e corpus"},
        )
    assert response.status_code == 201, response.text
    return response.json()


def create_job(client: httpx.Client, corpus_id: str, **overrides: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={"corpus_id": corpus_id, **TINY_JOB, **overrides})
    assert response.status_code == 201, response.text
    return response.json()


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """Every event of a job, oldest first."""
    found: list[dict[str, Any]] = []
    after = None
    while True:
        params = {"limit": 1000, **({"after": after} if after is not None else {})}
        response = client.get(f"/v1/jobs/{job_id}/events", params=params)
        assert response.status_code == 200, response.text
        page = response.json()["data"]
        if not page:
            return found
        found.extend(page)
        after = page[-1]["id"]


def wait_for_event(
    client: httpx.Client, job_id: str, predicate: Any, timeout: float, stack: ServiceStack
) -> dict[str, Any]:
    """Poll a job's events until one satisfies `predicate`; returns that event."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in events(client, job_id):
            if predicate(event):
                return event
        job = get_job(client, job_id)
        if job["status"] in ("failed", "cancelled", "succeeded"):
            break
        time.sleep(0.3)
    job = get_job(client, job_id)
    raise AssertionError(f"no such event for job {job_id} (status {job['status']}, stage "
                         f"{job['stage']}, error {job['error']})\n{stack.diagnostics()}")


# Training long enough that a worker killed when distill starts dies with the stage in flight
# (the tiny default can finish between two polls on an idle machine).
LONG_TRAINING = {
    "hyperparameters": {
        **TINY_JOB["hyperparameters"],
        "training": {**TINY_JOB["hyperparameters"]["training"], "max_epochs": 8, "patience": 8},
    }
}


def stage_started(stage: str) -> Any:
    """An event predicate: `stage` has started (recorded before the stage computes anything)."""
    return lambda e: e["kind"] == "stage" and e["stage"] == stage and e["message"].endswith(
        " started"
    )


def wait_for_job(
    client: httpx.Client, job_id: str, until: Any, timeout: float, stack: ServiceStack
) -> dict[str, Any]:
    """Poll the job until `until(job)` is true; fail with the process logs on timeout."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = get_job(client, job_id)
        if until(job):
            return job
        if job["status"] in ("failed", "cancelled", "succeeded"):
            break
        time.sleep(0.5)
    raise AssertionError(
        f"job {job_id} ended as {job.get('status')} / {job.get('error')} "
        f"(stage {job.get('stage')})\n{stack.diagnostics()}"
    )


def download_and_compare(client: httpx.Client, model_id: str, target: Path) -> None:
    """Download the tuned model archive, load it with sentence-transformers, and check its
    vectors match the API's /v1/embed for queries and passages (1e-5)."""
    import tarfile

    # S3: a 307 to a presigned URL (httpx drops our Authorization header for the other host);
    # local store: streamed by the API.
    response = client.get(f"/v1/models/{model_id}/download", follow_redirects=True)
    assert response.status_code == 200, response.text
    archive = target / "model.tar.gz"
    archive.write_bytes(response.content)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(target / "unpacked", filter="data")
    folder = target / "unpacked" / model_id
    # The report for people travels with the model (and does not disturb loading it).
    assert "Evaluation report" in (folder / "report.html").read_text(encoding="utf-8")
    # So does its model card: what it is, from which base, how it scored, under which licence.
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlibrary_name: sentence-transformers") and f"# {model_id}" in card
    assert "## Evaluation" in card and "## Licence" in card

    def served(texts: list[str], kind: str) -> list[list[float]]:
        response = client.post(
            "/v1/embed", json={"model": model_id, "inputs": texts, "input_type": kind}
        )
        assert response.status_code == 200, response.text
        return [row["embedding"] for row in response.json()["data"]]

    assert_loads_as_served(folder, served)


def assert_loads_as_served(folder: Path, served: Any) -> None:
    """The model folder loads with sentence-transformers, and its vectors match what the API
    serves (`served(texts, "query" | "passage")`) for queries and passages (1e-5)."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    assert (folder / "modules.json").is_file(), sorted(p.name for p in folder.iterdir())
    model = SentenceTransformer(str(folder), device="cpu")
    queries = ["what is the flow over a wing", "heat transfer in a boundary layer"]
    passages = ["the pressure distribution on a thin wing.", "shock waves and heat flux."]
    for texts, kind in ((queries, "query"), (passages, "passage")):
        local = model.encode(texts, prompt_name=kind, convert_to_numpy=True)
        np.testing.assert_allclose(np.array(served(texts, kind), dtype=np.float32), local,
                                   atol=1e-5, rtol=0)


def run_full_loop(stack: ServiceStack, corpus: Path, tmp: Path, timeout: float = 240) -> str:
    """Upload a corpus, run a tiny job to success, download and check the model; returns the
    job id."""
    with stack.client() as client:
        corpus_row = upload_corpus(client, corpus)
        job = create_job(client, corpus_row["id"])
        assert job["status"] == "queued"
        done = wait_for_job(client, job["id"], lambda j: j["status"] == "succeeded", timeout, stack)
        assert done["progress"] == 1.0 and done["stage"] == "evaluate"
        assert done["recommended"] in ("tuned", "base")
        assert "ndcg@10" in done["metrics"]["base"] and "ndcg@10" in done["metrics"]["tuned"]
        assert set(done["metrics"]["stages"]) == {
            "prepare",
            "generate",
            "filter",
            "distill",
            "evaluate",
        }
        model = client.get(f"/v1/models/{done['model_id']}")
        assert model.status_code == 200, model.text
        # A tuned model that does not beat its base is never presented as the recommendation.
        assert model.json()["recommended"] == (done["recommended"] == "tuned")
        report = client.get(f"/v1/jobs/{job['id']}/report")
        assert report.status_code == 200 and report.json()["recommended"] == done["recommended"]
        # How sure the gain is: in the job's metrics, from the report's per-query scores.
        per_query = report.json()["per_query"]
        assert done["metrics"]["significance"] == report.json()["significance"]
        assert per_query and done["metrics"]["significance"]["queries"] == len(per_query)
        download_and_compare(client, done["model_id"], tmp)
        return job["id"]
