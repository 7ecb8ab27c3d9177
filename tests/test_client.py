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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tailor_client import AuthenticationError, Client, InvalidRequestError, NotFoundError

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
    with running_stack(environment, tmp_path_factory.mktemp(environment), model_store) as stack:
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


def tiny_job_options() -> list[str]:
    return [
        "--base-model", TINY_JOB["base_model"],
        "--teacher", TINY_JOB["teacher"],
        "--generator", TINY_JOB["generator"],
        "--query-types", ",".join(TINY_JOB["query_types"]),
        "--passages", str(TINY_JOB["passages"]),
        "--hyperparameters", json.dumps(TINY_JOB["hyperparameters"]),
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
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "d1", "text": "fine"}\n{"_id": "d2"}\n')
    with pytest.raises(InvalidRequestError) as invalid:
        client.corpora.upload(bad)
    assert invalid.value.code == "invalid_corpus" and invalid.value.status_code == 422
    assert invalid.value.context["line"] == 2 and invalid.value.field == "text"
    done = cli(stack, "corpora", "upload", str(bad))
    assert done.returncode == 1 and "error: invalid_corpus: bad.jsonl" in done.stderr
    assert "line 2" in done.stderr
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
        [str(BIN / "tailor-client"), "jobs", "create", "--corpus", corpus_id,
         *tiny_job_options(), "--wait"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
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
