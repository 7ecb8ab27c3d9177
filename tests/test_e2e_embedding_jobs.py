"""Bulk embedding jobs and customers' own models, end to end over real HTTP: the API under
uvicorn and a prefork Celery worker as real processes, in the production configuration
(PostgreSQL, Redis, S3 through nanio) and on the embedded default (SQLite, a local object
folder, the filesystem broker). One stack per configuration for the whole module."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.embedding_jobs.files import embeddings_key
from app.storage import ObjectNotFound
from tests.model_archives import BAD_ARCHIVES, bad_archive, customer_folder, pack
from tests.processes import NanioServer, nanio_server
from tests.service_stack import (
    TINY_JOB,
    ServiceStack,
    embedded_env,
    flush_redis,
    postgres_database,
    production_env,
    synthetic_corpus,
    upload_corpus,
)
from worker.artifacts import store_for

pytestmark = pytest.mark.slow

VISIBILITY_TIMEOUT_S = 6
# Small enough that the tiny model with a stray file passes and the bomb does not.
UNPACKED_LIMIT = {"TAILOR_MODEL_UNPACKED_MAX_BYTES": "2000000"}
# The corpus a run is interrupted in: enough shards that it is still running when the test
# acts, few enough to finish in seconds.
MANY_DOCUMENTS = 240
SHARD = 4
SHARDS = MANY_DOCUMENTS // SHARD


@pytest.fixture(scope="module")
def nanio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NanioServer]:
    root = tmp_path_factory.mktemp("nanio")
    with nanio_server(root / "data", root / "logs") as server:
        yield server


@pytest.fixture(scope="module")
def production(
    tmp_path_factory: pytest.TempPathFactory, nanio: NanioServer, model_store: Path
) -> Iterator[ServiceStack]:
    root = tmp_path_factory.mktemp("prod-embed")
    flush_redis()
    with postgres_database() as database_url:
        env = production_env(root, database_url, nanio, model_store, VISIBILITY_TIMEOUT_S)
        stack = ServiceStack({**env, **UNPACKED_LIMIT}, root)
        try:
            stack.migrate_and_create_tenant()
            stack.start_api()
            stack.start_worker("worker-embed-1")
            yield stack
        finally:
            stack.stop()
            flush_redis()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, model_store: Path
             ) -> Iterator[ServiceStack]:
    root = tmp_path_factory.mktemp("embedded-embed")
    stack = ServiceStack({**embedded_env(root, model_store), **UNPACKED_LIMIT}, root)
    try:
        stack.migrate_and_create_tenant()
        stack.start_api()
        stack.start_worker("worker-embedded-embed")
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def good_folder(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return customer_folder(model_store, tmp_path_factory.mktemp("customer") / "my-model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_corpus(tmp_path_factory.mktemp("big") / "corpus.jsonl",
                            documents=MANY_DOCUMENTS, seed=3)


# ---------------------------------------------------------------------------------------------
# Customer-side helpers


def upload_model(client: httpx.Client, archive: Path, name: str = "") -> httpx.Response:
    with archive.open("rb") as handle:
        return client.post("/v1/models", files={"file": (archive.name, handle)},
                           data={"name": name} if name else {})


def wait_for(client: httpx.Client, url: str, until: Any, timeout: float,
             stack: ServiceStack) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(url)
        assert response.status_code == 200, response.text
        body = response.json()
        if until(body):
            return body
        if body["status"] in ("failed", "cancelled", "succeeded"):
            break
        time.sleep(0.3)
    raise AssertionError(f"{url}: {body.get('status')} {body.get('error')}\n"
                         f"{stack.diagnostics()}")


def succeeded(body: dict[str, Any]) -> bool:
    return body["status"] == "succeeded"


def all_events(client: httpx.Client, url: str) -> list[dict[str, Any]]:
    response = client.get(url + "/events", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def embed(client: httpx.Client, model: str, texts: list[str], kind: str) -> np.ndarray:
    response = client.post("/v1/embed", json={"model": model, "inputs": texts,
                                              "input_type": kind, "truncate": True})
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


def downloaded_rows(client: httpx.Client, job_id: str) -> tuple[np.ndarray, list[dict], dict]:
    """The job's vectors, row records and manifest from its one-file download."""
    response = client.get(f"/v1/embedding-jobs/{job_id}/download")
    assert response.status_code == 200, response.text
    assert int(response.headers["content-length"]) == len(response.content)
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:") as tar:
        for member in tar:
            assert member.name.startswith(f"{job_id}/")
            data = tar.extractfile(member)
            assert data is not None
            files[member.name.split("/", 1)[1]] = data.read()
    manifest = json.loads(files["manifest.json"])
    vectors, rows = [], []
    for shard in manifest["shards"]:
        for name in (shard["vectors"], shard["ids"]):  # as the worker wrote them
            assert hashlib.sha256(files[name]).hexdigest() == shard["sha256"][name]
        vectors.append(np.load(io.BytesIO(files[shard["vectors"]])))
        rows += [json.loads(line) for line in files[shard["ids"]].decode().splitlines()]
    return np.concatenate(vectors), rows, manifest


def row_texts(corpus: Path, rows: list[dict]) -> list[str]:
    """What each row embeds: "title text", the chunk's span of the text for a chunk."""
    documents = {d["_id"]: d for d in map(json.loads, corpus.read_text().splitlines())}
    texts = []
    for row in rows:
        doc = documents[row["document_id"]]
        text = doc["text"][row["start"]:row["end"]] if "start" in row else doc["text"]
        texts.append(f"{doc['title']} {text}")
    return texts


def stored_shards(stack: ServiceStack, job_id: str) -> int:
    try:
        manifest = store_for(stack.settings()).get_bytes(embeddings_key(job_id, "manifest.json"))
    except ObjectNotFound:
        return 0
    return len(json.loads(manifest)["shards"])


def wait_for_shards(stack: ServiceStack, job_id: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while stored_shards(stack, job_id) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{job_id}: fewer than {count} shards\n{stack.diagnostics()}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# Bring your own model


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_a_bad_archive_is_refused_naming_the_file(
    production: ServiceStack, good_folder: Path, tmp_path: Path, case: str
) -> None:
    archive = bad_archive(good_folder, case, tmp_path)
    _, _, culprit, status = BAD_ARCHIVES[case]
    with production.client() as client:
        before = client.get("/v1/models").json()["count"]
        response = upload_model(client, archive)
        assert response.status_code == status, response.text
        body = response.json()
        named = "model.tar.gz: " + ("" if culprit == "model.tar.gz" else f"{culprit}: ")
        assert body["file"] == culprit and body["detail"].startswith(named), body
        # Nothing was kept.
        assert client.get("/v1/models").json()["count"] == before


def test_an_archive_that_is_not_gzip_is_refused(production: ServiceStack) -> None:
    with production.client() as client:
        response = client.post("/v1/models", files={"file": ("model.tar.gz", b"plain text")})
    assert response.status_code == 422 and response.json()["error"] == "invalid_model"
    assert "not a .tar.gz" in response.json()["detail"]


def test_an_uploaded_model_embeds_everywhere_and_is_tuned_again(
    production: ServiceStack, good_folder: Path, corpus: Path, tmp_path: Path
) -> None:
    """Upload, embed on both routes (the vectors sentence-transformers gives the folder), tune
    it as a job's base model, download the tuned folder (its model card names the upload), start
    tuning the tuned model again, and re-index the corpus with the tuned model in one call."""
    from sentence_transformers import SentenceTransformer

    texts = ["drag on a swept wing", "heat transfer in a boundary layer"]
    with production.client() as client:
        # Files at the archive's top level (no enclosing folder) are accepted too.
        response = upload_model(client, pack(good_folder, tmp_path / "m.tar.gz", top=None),
                                name="our production model")
        assert response.status_code == 201, response.text
        uploaded = response.json()
        assert (uploaded["kind"], uploaded["name"], uploaded["dim"]) == (
            "uploaded", "our production model", 32)
        assert client.get(f"/v1/models/{uploaded['id']}").json()["kind"] == "uploaded"

        local = SentenceTransformer(str(good_folder), device="cpu")
        served = embed(client, uploaded["id"], texts, "query")
        np.testing.assert_allclose(served, local.encode(texts, prompt_name="query"), atol=1e-5)
        assert not np.allclose(served, embed(client, "tiny-student", texts, "query"), atol=1e-3)
        openai = client.post("/v1/embeddings", json={"model": uploaded["id"], "input": texts})
        assert openai.status_code == 200, openai.text
        np.testing.assert_allclose(
            [row["embedding"] for row in openai.json()["data"]],
            local.encode(texts, prompt_name="passage"), atol=1e-5)

        corpus_id = upload_corpus(client, corpus)["id"]
        job = client.post("/v1/jobs", json={"corpus_id": corpus_id, **TINY_JOB,
                                            "base_model": uploaded["id"]})
        assert job.status_code == 201, job.text
        done = wait_for(client, f"/v1/jobs/{job.json()['id']}", succeeded, 300, production)
        tuned = client.get(f"/v1/models/{done['model_id']}").json()
        assert tuned["base_model"] == uploaded["id"]

        # The downloaded tuned folder holds its model card.
        response = client.get(f"/v1/models/{tuned['id']}/download", follow_redirects=True)
        assert response.status_code == 200, response.text
        with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
            card = tar.extractfile(f"{tuned['id']}/README.md")
            assert card is not None
            text = card.read().decode()
        assert text.startswith("---\nlibrary_name: sentence-transformers")
        assert f"# {tuned['id']}" in text and f"**{uploaded['id']}**" in text
        assert "## Evaluation" in text and "tiny-teacher" in text

        # A model Tailor tuned is a base model too: the worker loads it to prepare the corpus.
        again = client.post("/v1/jobs", json={"corpus_id": corpus_id, **TINY_JOB,
                                              "base_model": tuned["id"]})
        assert again.status_code == 201 and again.json()["recipe"]["student"] == tuned["id"]
        url = f"/v1/jobs/{again.json()['id']}"
        wait_for(client, url, lambda j: j["stage"] not in (None, "prepare"), 120, production)
        assert client.post(url + "/cancel").status_code == 200

        # Re-index after tuning: one call, the corpus is the one the model was tuned on.
        created = client.post("/v1/embedding-jobs", json={"model": tuned["id"]})
        assert created.status_code == 201, created.text
        assert created.json()["corpus_id"] == corpus_id
        bulk = wait_for(client, f"/v1/embedding-jobs/{created.json()['id']}", succeeded, 120,
                        production)
        vectors, rows, manifest = downloaded_rows(client, bulk["id"])
        assert bulk["metrics"]["documents"] == 60 == manifest["documents"]
        assert bulk["metrics"]["rows"] == len(rows) == len(vectors)
        assert [r["document_id"] for r in rows if "start" not in r] == [
            json.loads(line)["_id"] for line in corpus.read_text().splitlines()]
        np.testing.assert_allclose(
            vectors, embed(client, tuned["id"], row_texts(corpus, rows), "passage"), atol=1e-5)


def test_models_of_others_and_unknown_ones_are_refused(production: ServiceStack) -> None:
    with production.client() as client:
        corpus_id = client.get("/v1/corpora").json()["data"][0]["id"]
        for body, field in (({"model": "mdl_000000000000000000000000", "corpus_id": corpus_id},
                             "model"), ({"model": "tiny-teacher", "corpus_id": corpus_id},
                                        "model"), ({"model": "tiny-student"}, "corpus_id")):
            response = client.post("/v1/embedding-jobs", json=body)
            assert response.status_code == 422 and response.json()["field"] == field, body
        job = client.post("/v1/jobs", json={"corpus_id": corpus_id, **TINY_JOB,
                                            "base_model": "mdl_000000000000000000000000"})
        assert job.status_code == 422 and job.json()["field"] == "base_model"


# ---------------------------------------------------------------------------------------------
# Bulk embedding: cancel, and a worker killed mid-run


def start_bulk(client: httpx.Client, corpus_id: str, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/embedding-jobs", json={"model": "tiny-student",
                                                       "corpus_id": corpus_id,
                                                       "shard_documents": SHARD, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def test_cancel_stops_a_running_bulk_job(production: ServiceStack, big_corpus: Path) -> None:
    with production.client() as client:
        corpus_id = upload_corpus(client, big_corpus)["id"]
        job = start_bulk(client, corpus_id)
        wait_for_shards(production, job["id"], 2, 60)
        response = client.post(f"/v1/embedding-jobs/{job['id']}/cancel")
        assert response.status_code == 200, response.text
        done = wait_for(client, f"/v1/embedding-jobs/{job['id']}",
                        lambda j: j["status"] == "cancelled", 30, production)
        assert done["finished_at"] is not None and done["metrics"] == {}
        files = client.get(f"/v1/embedding-jobs/{job['id']}/files").json()
        assert not files["complete"] and files["data"][0]["name"] == "manifest.json"
        assert 0 < len(files["data"]) < 1 + 2 * SHARDS
        assert client.get(f"/v1/embedding-jobs/{job['id']}/download").status_code == 409
        again = client.post(f"/v1/embedding-jobs/{job['id']}/cancel")
        assert again.status_code == 409


def _resumes_after_a_kill(stack: ServiceStack, corpus: Path, tmp_path: Path,
                          new_host: bool) -> None:
    with stack.client() as client:
        corpus_id = upload_corpus(client, corpus)["id"]
        job = start_bulk(client, corpus_id, long_documents="truncate", input_type="query")
        wait_for_shards(stack, job["id"], 3, 60)
        for worker in stack.workers:  # the machine dies: nothing is acknowledged
            if worker.alive():
                worker.kill()
        killed_at = stored_shards(stack, job["id"])
        assert killed_at < SHARDS, "the run finished before the kill"
        stack.start_worker(f"worker-after-kill-{tmp_path.name[-6:]}",
                           work_dir=tmp_path / "host-2" if new_host else None)
        url = f"/v1/embedding-jobs/{job['id']}"
        done = wait_for(client, url, succeeded, 120, stack)
        timeline = all_events(client, url)
        vectors, rows, manifest = downloaded_rows(client, job["id"])
        listed = client.get(url + "/files").json()
    # The new run started after the last shard the manifest listed when the worker died.
    assert done["attempts"] >= 2 and done["metrics"]["resumed_at_shard"] == killed_at
    resumed = [e for e in timeline if e["message"].startswith("resuming after shard")]
    assert [e["data"]["shards_done"] for e in resumed] == [killed_at]
    starts = [e for e in timeline if e["kind"] == "stage" and e["message"] == "embed started"]
    assert len(starts) >= 2 and starts[-1]["data"]["attempt"] >= 2
    assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == list(
        range(SHARDS))
    assert [r["id"] for r in rows] == [json.loads(line)["_id"]
                                       for line in corpus.read_text().splitlines()]
    assert listed["complete"] and listed["count"] == 1 + 2 * SHARDS
    with stack.client() as client:
        sample = list(range(0, len(rows), 17))
        expected = embed(client, "tiny-student", [row_texts(corpus, rows)[i] for i in sample],
                         "query")
    np.testing.assert_allclose(vectors[sample], expected, atol=1e-5)


def test_a_killed_worker_resumes_from_the_last_finished_shard(
    production: ServiceStack, big_corpus: Path, tmp_path: Path
) -> None:
    _resumes_after_a_kill(production, big_corpus, tmp_path, new_host=True)


# ---------------------------------------------------------------------------------------------
# The embedded default


def test_embedded_upload_bulk_job_and_resume_after_a_kill(
    embedded: ServiceStack, good_folder: Path, big_corpus: Path, tmp_path: Path
) -> None:
    with embedded.client() as client:
        response = upload_model(client, pack(good_folder, tmp_path / "m.tar.gz"))
        assert response.status_code == 201, response.text
        model_id = response.json()["id"]
        assert embed(client, model_id, ["a wing"], "passage").shape == (1, 32)
        # A file of a shard, fetched on its own.
        corpus_id = upload_corpus(client, big_corpus)["id"]
        job = client.post("/v1/embedding-jobs", json={"model": model_id, "corpus_id": corpus_id,
                                                      "shard_documents": 100})
        assert job.status_code == 201, job.text
        wait_for(client, f"/v1/embedding-jobs/{job.json()['id']}", succeeded, 120, embedded)
        ids = client.get(f"/v1/embedding-jobs/{job.json()['id']}/files/ids-00002.jsonl")
        assert ids.status_code == 200 and len(ids.text.splitlines()) == MANY_DOCUMENTS - 200
        missing = client.get(f"/v1/embedding-jobs/{job.json()['id']}/files/vectors-1.npy")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    # The filesystem broker loses a killed worker's task: the restarted worker sends it again.
    _resumes_after_a_kill(embedded, big_corpus, tmp_path, new_host=False)
