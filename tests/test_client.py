"""The Python client and its command line against the running service, in the embedded
default and in the production configuration: real uvicorn, a real Celery worker, tiny models.
The command line runs as the installed `tailor-client` script in a subprocess, the way a
customer runs it. One stack per environment; one job runs to its end in each."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tailor_client import (
    AuthenticationError,
    Client,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    WebhookVerificationError,
)
from tailor_client.webhooks import verify

from tests.model_archives import customer_folder, pack
from tests.processes import BIN
from tests.service_stack import (
    TINY_JOB,
    ServiceStack,
    assert_loads_as_served,
    running_stack,
    synthetic_corpus,
)

pytestmark = pytest.mark.slow

STAGES = ("prepare", "generate", "filter", "distill", "evaluate")


@pytest.fixture(scope="module", params=["embedded", "production"])
def environment(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def stack(
    environment: str, tmp_path_factory: pytest.TempPathFactory, model_store: Path
) -> Iterator[ServiceStack]:
    # The webhook receiver below listens on loopback, which a deployment refuses by default.
    with running_stack(environment, tmp_path_factory.mktemp(environment), model_store,
                       settings={"TAILOR_WEBHOOK_ALLOW_LOOPBACK": "true",
                                 "TAILOR_WEBHOOK_BACKOFF_BASE_S": "0.5"}) as stack:
        yield stack


@pytest.fixture
def client(stack: ServiceStack) -> Iterator[Client]:
    with Client(stack.api_url, api_key=stack.api_key) as client:
        yield client


def cli(stack: ServiceStack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `tailor-client ARGS` configured by the environment, as a customer would."""
    env = {**os.environ, "TAILOR_BASE_URL": stack.api_url, "TAILOR_API_KEY": stack.api_key,
           "COLUMNS": "120"}
    return subprocess.run([str(BIN / "tailor-client"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(done: subprocess.CompletedProcess, stack: ServiceStack) -> str:
    assert done.returncode == 0, f"{done.args}\n{done.stdout}\n{done.stderr}\n" \
        f"{stack.diagnostics()}"
    return done.stdout


def tiny_job_options(training: dict[str, Any] | None = None) -> list[str]:
    """The tiny job as CLI options; `training` overrides its training settings."""
    hyperparameters = TINY_JOB["hyperparameters"]
    if training:
        hyperparameters = {**hyperparameters,
                           "training": {**hyperparameters["training"], **training}}
    return [
        "--base-model", TINY_JOB["base_model"],
        "--teacher", TINY_JOB["teacher"],
        "--generator", TINY_JOB["generator"],
        "--query-types", ",".join(TINY_JOB["query_types"]),
        "--passages", str(TINY_JOB["passages"]),
        "--hyperparameters", json.dumps(hyperparameters),
    ]


def judgements(corpus: Path, folder: Path) -> tuple[Path, Path]:
    """BEIR queries and qrels judging the corpus's first documents (their first words)."""
    documents = [json.loads(line) for line in corpus.open()][:8]
    queries, qrels = folder / "queries.jsonl", folder / "qrels.tsv"
    queries.write_text("".join(
        json.dumps({"_id": f"q{i}", "text": " ".join(d["text"].split()[:6])}) + "\n"
        for i, d in enumerate(documents)))
    qrels.write_text("".join(f"q{i}\t{d['_id']}\t1\n" for i, d in enumerate(documents)))
    return queries, qrels


def test_upload_with_the_cli_and_page_through_corpora(
    stack: ServiceStack, client: Client, tmp_path: Path
) -> None:
    corpus = synthetic_corpus(tmp_path / "corpus.jsonl")
    uploaded = json.loads(ok(cli(stack, "--json", "corpora", "upload", str(corpus),
                                 "--name", "cli corpus"), stack))
    assert uploaded["documents"] == 60 and uploaded["name"] == "cli corpus"
    for seed in (1, 2):
        client.corpora.upload(synthetic_corpus(tmp_path / f"c{seed}.jsonl", 5, seed))
    page = client.corpora.list(limit=2)
    assert len(page["data"]) == 2 and page["count"] >= 3
    ids = [row["id"] for row in client.corpora.iter(page_size=2)]
    assert len(ids) == len(set(ids)) == page["count"] and uploaded["id"] in ids
    listed = ok(cli(stack, "corpora", "list", "--limit", "100"), stack)
    assert uploaded["id"] in listed and "cli corpus" in listed


def test_every_collection_reads_back_and_embeds_with_a_base_model(
    stack: ServiceStack, client: Client, tmp_path: Path
) -> None:
    corpus = synthetic_corpus(tmp_path / "corpus.jsonl", 10, 3)
    corpus_row = client.corpora.upload(corpus, name="read back")
    assert client.corpora.get(corpus_row["id"]) == corpus_row
    queries, qrels = judgements(corpus, tmp_path)
    eval_set = client.eval_sets.create(corpus_row["id"], queries, qrels, name="judged")
    query_set = client.query_sets.create(corpus_row["id"], queries, name="search log")
    assert (eval_set["queries"], query_set["queries"]) == (8, 8)
    for collection, row in ((client.eval_sets, eval_set), (client.query_sets, query_set)):
        assert collection.get(row["id"]) == row and row in list(collection.iter())
    assert client.models.get("tiny-student")["kind"] == "base"
    assert "tiny-student" in [model["id"] for model in client.models.iter(page_size=1)]
    assert client.health() == {"status": "ok"} and client.ready()["status"] == "ready"
    assert "ready" in ok(cli(stack, "health"), stack)

    texts = ["flow over a wing", "heat flux"]
    ours = client.embed("tiny-student", texts, input_type="query")
    openai = client.embeddings("tiny-student", texts, input_type="query")
    assert [row["embedding"] for row in openai["data"]] == \
        [row["embedding"] for row in ours["data"]]
    assert openai["usage"]["total_tokens"] > 0

    client.corpora.delete(corpus_row["id"])
    with pytest.raises(NotFoundError):
        client.corpora.get(corpus_row["id"])


def test_errors_carry_the_apis_code_and_detail(
    stack: ServiceStack, client: Client, tmp_path: Path
) -> None:
    with pytest.raises(NotFoundError) as missing:
        client.jobs.get("job_000000000000000000000000")
    assert missing.value.code == "not_found" and "job_000000000000000000000000" in \
        missing.value.detail
    # The id the server logged the request under, as sent by the client.
    assert re.fullmatch(r"req_[0-9a-f]{32}", missing.value.request_id or "")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "d1", "text": "fine"}\n{"_id": "d2"}\n')
    with pytest.raises(InvalidRequestError) as invalid:
        client.corpora.upload(bad)
    assert invalid.value.code == "invalid_corpus" and invalid.value.status_code == 422
    assert invalid.value.context["line"] == 2 and invalid.value.field == "text"
    done = cli(stack, "corpora", "upload", str(bad))
    assert done.returncode == 1 and "error: invalid_corpus: bad.jsonl" in done.stderr
    assert "line 2" in done.stderr and re.search(r"\[request req_[0-9a-f]{32}\]", done.stderr)
    with Client(stack.api_url, api_key="tlr_not-a-key") as stranger:
        with pytest.raises(AuthenticationError) as refused:
            stranger.models.list()
    assert refused.value.code == "unauthorized"


def test_a_job_through_the_cli_from_upload_to_embeddings(
    stack: ServiceStack, client: Client, environment: str, tmp_path: Path
) -> None:
    """Upload, (eval set,) `jobs create --wait`, the report table, `models download` into a
    folder SentenceTransformer loads, and embed. The embedded run judges with the customer's
    eval set; the production run with synthetic queries, whose report has query types."""
    corpus = synthetic_corpus(tmp_path / "corpus.jsonl", seed=5)
    corpus_id = client.corpora.upload(corpus, name="job corpus")["id"]
    options = tiny_job_options()
    if environment == "embedded":
        queries, qrels = judgements(corpus, tmp_path)
        eval_set = json.loads(ok(cli(stack, "eval-sets", "create", "--corpus", corpus_id,
                                     "--queries", str(queries), "--qrels", str(qrels),
                                     "--json"), stack))
        assert eval_set["queries"] == 8 and eval_set["corpus_id"] == corpus_id
        options += ["--eval-set", eval_set["id"]]

    done = cli(stack, "--json", "jobs", "create", "--corpus", corpus_id, *options, "--wait",
               timeout=300)
    job = json.loads(ok(done, stack))
    assert job["status"] == "succeeded" and job["model_id"]
    for stage in STAGES:  # a bar per stage, each finished
        assert re.search(rf"{stage}\s.*100%", done.stderr), done.stderr
    assert f"job {job['id']} succeeded" in done.stderr

    report = client.jobs.report(job["id"])
    table = ok(cli(stack, "jobs", "report", job["id"]), stack)
    assert f"Recommended: {report['recommended']}" in table
    page = tmp_path / "report.html"
    ok(cli(stack, "jobs", "report", job["id"], "--html", str(page)), stack)
    assert "Evaluation report" in page.read_text(encoding="utf-8")
    assert client.jobs.report_html(job["id"]) == page.read_text(encoding="utf-8")
    for row in ("base", "tuned"):
        assert f"{report[row]['ndcg@10']:.4f}" in table
    low, high = report["significance"]["ci95"]
    assert f"[{low:+.4f}, {high:+.4f}]" in table
    for warning in report["warnings"]:
        assert warning[:40] in " ".join(table.split())
    if environment == "production":
        assert report["judgements"] == "synthetic" and "Per query type" in table
        assert all(name in table for name in report["per_query_type"])
    else:
        assert report["judgements"] == "customer" and "customer judgements" in table
    assert job["id"] in ok(cli(stack, "jobs", "list"), stack)

    folder = tmp_path / "retriever"
    ok(cli(stack, "models", "download", job["model_id"], str(folder)), stack)

    def served(texts: list[str], kind: str) -> list[list[float]]:
        return [row["embedding"] for row in client.embed(job["model_id"], texts,
                                                         input_type=kind)["data"]]

    assert_loads_as_served(folder, served)
    vectors = json.loads(ok(cli(stack, "embed", "--model", job["model_id"], "--input-type",
                                "query", "flow over a wing"), stack))
    assert vectors["data"][0]["embedding"] == served(["flow over a wing"], "query")[0]


def test_ctrl_c_while_waiting_asks_and_cancels_the_job(
    stack: ServiceStack, client: Client, tmp_path: Path
) -> None:
    corpus_id = client.corpora.upload(synthetic_corpus(tmp_path / "c.jsonl", 30, 9))["id"]
    env = {**os.environ, "TAILOR_BASE_URL": stack.api_url, "TAILOR_API_KEY": stack.api_key}
    process = subprocess.Popen(
        # Training long enough that the job is still running when Ctrl-C comes.
        [str(BIN / "tailor-client"), "jobs", "create", "--corpus", corpus_id,
         *tiny_job_options({"max_epochs": 100, "patience": 100}), "--wait"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
        # A suite started in the background by a shell inherits SIGINT ignored, and Python
        # then never turns Ctrl-C into KeyboardInterrupt: give the client a terminal's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stderr is not None and process.stdin is not None
        first = process.stderr.readline()  # "job job_... queued": following from here on
        job_id = re.search(r"job (job_\w+)", first)
        assert job_id, first
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        process.stdin.write("y\n")
        process.stdin.flush()
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 3, err
    assert f"Cancel job {job_id.group(1)}?" in err
    assert client.jobs.get(job_id.group(1))["status"] == "cancelled"
    # Cancelling again (a retry whose answer was lost) is not an error.
    assert client.jobs.cancel(job_id.group(1))["status"] == "cancelled"


def test_rerank_and_api_keys_through_the_client_and_the_cli(
    stack: ServiceStack, client: Client
) -> None:
    assert "tiny-teacher" in [m["id"] for m in client.rerank_models()]
    assert "tiny-teacher" in ok(cli(stack, "rerank-models"), stack)
    documents = ["heat flux in a boundary layer", "the pressure on a thin wing",
                 "shock waves and heat transfer"]
    ranked = client.rerank("tiny-teacher", "heat transfer", documents, top_n=2,
                           return_documents=True)
    scores = [r["relevance_score"] for r in ranked["results"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert all(documents[r["index"]] == r["document"]["text"] for r in ranked["results"])
    every = client.rerank("tiny-teacher", "heat transfer", documents)
    order = [r["index"] for r in every["results"]]
    assert sorted(order) == [0, 1, 2] and order[:2] == [r["index"] for r in ranked["results"]]
    table = ok(cli(stack, "rerank", "tiny-teacher", "heat transfer", *documents), stack)
    # Most relevant first: rank, the document's index in the request, its score, its text.
    shown = re.findall(r"^\s*(\d)\s+(\d)\s+(0\.\d{4})\s+(.+?)\s*$", table, re.M)
    assert [(int(i), text) for _, i, _, text in shown] == [(i, documents[i]) for i in order]
    as_json = json.loads(ok(cli(stack, "--json", "rerank", "tiny-teacher", "heat transfer",
                                *documents, "--top-n", "1"), stack))
    assert [r["index"] for r in as_json["results"]] == order[:1]

    # A key for a search service: it may embed and rerank, nothing else.
    created = json.loads(ok(cli(stack, "--json", "keys", "create", "--name", "search",
                                "--scope", "embed"), stack))
    assert created["scope"] == "embed" and created["status"] == "active"
    assert created["key"].startswith(created["prefix"])
    assert created["id"] in [k["id"] for k in client.api_keys.iter(page_size=1)]
    assert created["id"] in ok(cli(stack, "keys", "list"), stack)
    with Client(stack.api_url, api_key=created["key"]) as search:
        assert search.rerank("tiny-teacher", "heat", documents)["results"]
        with pytest.raises(PermissionDeniedError) as refused:
            search.corpora.list()
        assert refused.value.code == "insufficient_scope" and refused.value.request_id
        ok(cli(stack, "keys", "revoke", created["id"]), stack)
        with pytest.raises(AuthenticationError):
            search.rerank("tiny-teacher", "heat", documents)
    assert client.api_keys.get(created["id"])["status"] == "revoked"
    temporary = client.api_keys.create("short-lived", expires_in_days=1)
    assert temporary["expires_at"] and "key" not in client.api_keys.get(temporary["id"])
    client.api_keys.revoke(temporary["id"])


def test_upload_a_model_and_embed_a_corpus_with_it_in_bulk(
    stack: ServiceStack, client: Client, model_store: Path, tmp_path: Path
) -> None:
    """`models upload`, then `embedding-jobs create --wait` with it: the bar, the files, the
    download; the vectors are the ones /v1/embed serves."""
    import numpy as np

    archive = pack(customer_folder(model_store, tmp_path / "my-model"), tmp_path / "mine.tar.gz")
    model = json.loads(ok(cli(stack, "--json", "models", "upload", str(archive), "--name",
                              "mine"), stack))
    assert model["kind"] == "uploaded" and model["name"] == "mine"
    assert client.models.get(model["id"])["dim"] == model["dim"]
    exported = tmp_path / "exported"
    ok(cli(stack, "models", "download", model["id"], str(exported), "--onnx"), stack)
    assert (exported / "onnx" / "model.onnx").stat().st_size > 0
    assert (exported / "modules.json").is_file()
    corpus = synthetic_corpus(tmp_path / "corpus.jsonl", 10, 4)
    corpus_id = client.corpora.upload(corpus)["id"]

    done = cli(stack, "--json", "embedding-jobs", "create", "--corpus", corpus_id, "--model",
               model["id"], "--shard-documents", "4", "--wait", timeout=180)
    job = json.loads(ok(done, stack))
    assert job["status"] == "succeeded" and job["metrics"]["shards"] == 3
    assert re.search(r"embed\s.*100%", done.stderr), done.stderr
    assert f"embedding job {job['id']} succeeded: 10 vectors of 10 documents" in done.stderr
    assert job["id"] in [j["id"] for j in client.embedding_jobs.iter()]
    statuses = [e["data"].get("status") for e in client.embedding_jobs.iter_events(job["id"])
                if e["kind"] == "status"]
    assert statuses[-1] == "succeeded"
    files = client.embedding_jobs.files(job["id"])
    assert files["complete"] and files["count"] == 7 and files["data"][0]["name"] == \
        "manifest.json"
    with pytest.raises(ConflictError) as finished:
        client.embedding_jobs.cancel(job["id"])
    assert finished.value.code == "invalid_state"

    folder = tmp_path / "vectors"
    ok(cli(stack, "embedding-jobs", "download", job["id"], str(folder)), stack)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f["name"] for f in files["data"])
    vectors = np.concatenate([np.load(folder / f"vectors-{k:05d}.npy") for k in range(3)])
    rows = [json.loads(line) for k in range(3)
            for line in (folder / f"ids-{k:05d}.jsonl").read_text().splitlines()]
    documents = {d["_id"]: d for d in map(json.loads, corpus.read_text().splitlines())}
    assert [r["document_id"] for r in rows] == list(documents)
    texts = [f"{documents[r['document_id']]['title']} {documents[r['document_id']]['text']}"
             for r in rows]
    served = client.embed(model["id"], texts)["data"]
    np.testing.assert_allclose(vectors, [row["embedding"] for row in served], atol=1e-5)
    one = client.embedding_jobs.download_file(job["id"], "vectors-00001.npy", tmp_path / "v1")
    assert one.read_bytes() == (folder / "vectors-00001.npy").read_bytes()


@contextmanager
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """A webhook receiver on loopback: (its URL, the requests it got as (headers, raw body))."""
    got: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            got.append((dict(self.headers),
                        self.rfile.read(int(self.headers.get("Content-Length") or 0))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks", got
    finally:
        server.shutdown()
        server.server_close()


def until(predicate: Callable[[], Any], timeout: float, what: str, stack: ServiceStack) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s\n{stack.diagnostics()}")


def test_webhooks_tell_a_verified_receiver_and_redeliver(
    stack: ServiceStack, client: Client, tmp_path: Path
) -> None:
    corpus_id = client.corpora.upload(synthetic_corpus(tmp_path / "c.jsonl", 4, 2))["id"]
    with receiver() as (url, got):
        hook = json.loads(ok(cli(stack, "--json", "webhooks", "create", url, "--event",
                                 "job.succeeded", "--description", "client test"), stack))
        assert hook["secret"].startswith("whsec_") and hook["events"] == ["job.succeeded"]
        tag = f"t{time.monotonic_ns()}"
        job = client.embedding_jobs.create("tiny-student", corpus_id, name="reindex",
                                           metadata={"run": tag})
        job = client.embedding_jobs.wait(job["id"])
        assert job["status"] == "succeeded" and job["metadata"] == {"run": tag}
        until(lambda: got, 60, "no delivery", stack)
        headers, body = got[0]
        payload = verify(hook["secret"], body, headers)
        assert payload["type"] == "job.succeeded"
        assert (payload["data"]["id"], payload["data"]["object"]) == (job["id"], "embedding_job")
        with pytest.raises(WebhookVerificationError):
            verify(hook["secret"], body.replace(b"succeeded", b"failed"), headers)

        delivery = until(lambda: [d for d in client.webhooks.iter_deliveries(hook["id"])
                                  if d["status"] == "succeeded"], 30, "no delivery", stack)[0]
        assert delivery["message_id"] == headers["webhook-id"]
        listed = ok(cli(stack, "webhooks", "deliveries", hook["id"], "--status", "succeeded"),
                    stack)
        assert delivery["id"] in listed and "204" in listed
        again = json.loads(ok(cli(stack, "--json", "webhooks", "redeliver", hook["id"],
                                  delivery["id"]), stack))
        assert again["status"] == "pending"
        until(lambda: len(got) == 2, 60, "no redelivery", stack)
        assert got[1][0]["webhook-id"] == headers["webhook-id"]  # receivers drop duplicates
        assert verify(hook["secret"], got[1][1], got[1][0]) == payload
        until(lambda: client.webhooks.deliveries(hook["id"])["data"][0]["status"] != "pending",
              30, "the redelivery still pending", stack)

        ok(cli(stack, "webhooks", "update", hook["id"], "--disable"), stack)
        assert client.webhooks.get(hook["id"])["enabled"] is False
        with pytest.raises(ConflictError) as disabled:
            client.webhooks.redeliver(hook["id"], delivery["id"])
        assert disabled.value.code == "invalid_state" and "disabled" in disabled.value.detail
        assert hook["id"] in ok(cli(stack, "webhooks", "list"), stack)
        ok(cli(stack, "webhooks", "delete", hook["id"]), stack)
        with pytest.raises(NotFoundError):
            client.webhooks.get(hook["id"])

    assert [j["id"] for j in client.embedding_jobs.iter(name="reindex",
                                                        metadata={"run": tag})] == [job["id"]]
    assert job["id"] in ok(cli(stack, "embedding-jobs", "list", "--metadata", f"run={tag}"),
                           stack)
    renamed = json.loads(ok(cli(stack, "--json", "embedding-jobs", "update", job["id"],
                                "--name", "nightly reindex"), stack))
    assert (renamed["name"], renamed["metadata"]) == ("nightly reindex", {"run": tag})
    ok(cli(stack, "embedding-jobs", "delete", job["id"]), stack)
    with pytest.raises(NotFoundError):
        client.embedding_jobs.get(job["id"])


def test_names_metadata_and_deletes(
    stack: ServiceStack, client: Client, model_store: Path, tmp_path: Path
) -> None:
    corpus = synthetic_corpus(tmp_path / "corpus.jsonl", 10, 6)
    corpus_id = client.corpora.upload(corpus)["id"]
    tag = f"t{time.monotonic_ns()}"  # this run's jobs only, whatever else the stack holds
    job = json.loads(ok(cli(stack, "--json", "jobs", "create", "--corpus", corpus_id,
                            *tiny_job_options(), "--name", "nightly", "--metadata",
                            f"run={tag}", "--metadata", "team=search"), stack))
    assert (job["name"], job["metadata"]) == ("nightly", {"run": tag, "team": "search"})
    assert [j["id"] for j in client.jobs.iter(metadata={"run": tag})] == [job["id"]]
    assert client.jobs.list(name="nightly", metadata={"run": tag, "team": "other"})["count"] == 0
    listed = ok(cli(stack, "jobs", "list", "--name", "nightly", "--metadata", f"run={tag}"),
                stack)
    assert job["id"] in listed
    renamed = json.loads(ok(cli(stack, "--json", "jobs", "update", job["id"], "--name",
                                "weekly", "--clear-metadata"), stack))
    assert (renamed["name"], renamed["metadata"]) == ("weekly", {})
    assert client.jobs.update(job["id"], name=None)["name"] is None
    ok(cli(stack, "jobs", "delete", job["id"]), stack)  # cancels it: it had not finished
    with pytest.raises(NotFoundError):
        client.jobs.get(job["id"])

    archive = pack(customer_folder(model_store, tmp_path / "m", 0.9), tmp_path / "m.tar.gz")
    model = client.models.upload(archive, name="mine")
    updated = client.models.update(model["id"], name="ours", metadata={"run": tag})
    assert (updated["name"], updated["metadata"]) == ("ours", {"run": tag})
    assert [m["id"] for m in client.models.iter(name="ours", metadata={"run": tag})] == \
        [model["id"]]
    refused = cli(stack, "models", "update", model["id"], "--clear-name")
    assert refused.returncode == 1 and "name cannot be cleared" in refused.stderr
    ok(cli(stack, "models", "delete", model["id"]), stack)
    with pytest.raises(NotFoundError):
        client.models.get(model["id"])

    queries, qrels = judgements(corpus, tmp_path)
    eval_set = client.eval_sets.create(corpus_id, queries, qrels)
    query_set = client.query_sets.create(corpus_id, queries)
    ok(cli(stack, "eval-sets", "delete", eval_set["id"]), stack)
    with pytest.raises(NotFoundError):
        client.eval_sets.get(eval_set["id"])
    ok(cli(stack, "corpora", "delete", corpus_id), stack)  # its query set goes with it
    for gone in (lambda: client.corpora.get(corpus_id),
                 lambda: client.query_sets.get(query_set["id"])):
        with pytest.raises(NotFoundError):
            gone()
