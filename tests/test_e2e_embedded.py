"""End to end on the embedded default: SQLite, a local object folder and kombu's filesystem
broker (no server of any kind), with the API and a prefork Celery worker as real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.console_browser import use_the_console
from tests.service_stack import (
    LONG_TRAINING,
    ServiceStack,
    create_job,
    embedded_env,
    events,
    run_full_loop,
    stage_started,
    synthetic_corpus,
    upload_corpus,
    wait_for_event,
    wait_for_job,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[ServiceStack]:
    root = tmp_path_factory.mktemp("embedded")
    stack = ServiceStack(embedded_env(root, model_store), root)
    try:
        stack.migrate_and_create_tenant()
        stack.start_api()
        stack.start_worker("worker-embedded")
        yield stack
    finally:
        stack.stop()


def test_full_loop_on_the_embedded_default(stack: ServiceStack, tmp_path: Path) -> None:
    corpus = synthetic_corpus(tmp_path / "corpus.jsonl")
    job_id = run_full_loop(stack, corpus, tmp_path)
    objects = stack.root / "objects"
    # Every stage left its manifest in the local object store, and the archive is there.
    for stage in ("prepare", "generate", "filter", "distill", "evaluate"):
        assert (objects / "jobs" / job_id / stage / "manifest.json").is_file()
    assert list((objects / "models").glob("mdl_*/model.tar.gz"))
    # The broker really is a folder of message files, now drained.
    assert not list((stack.root / "broker" / "queue").glob("*.msg"))


def test_killed_embedded_worker_resumes_the_job_when_restarted(
    stack: ServiceStack, tmp_path: Path
) -> None:
    """The filesystem broker has no visibility timeout: the restarted worker re-sends the
    stage of a job left running, and the finished stages are not run again."""
    corpus = synthetic_corpus(tmp_path / "corpus.jsonl", seed=11)
    with stack.client() as client:
        corpus_id = upload_corpus(client, corpus)["id"]
        job = create_job(client, corpus_id, **LONG_TRAINING)
        # Kill while training is under way: a stage really in flight.
        wait_for_event(client, job["id"], stage_started("distill"), 120, stack)
        for worker in stack.workers:
            if worker.alive():
                worker.kill()
        stack.start_worker("worker-embedded-2")
        wait_for_job(client, job["id"], lambda j: j["status"] == "succeeded", 180, stack)
        timeline = events(client, job["id"])
    started = [
        e["stage"] for e in timeline if e["kind"] == "stage" and e["message"].endswith(" started")
    ]
    assert started.count("distill") >= 2
    for stage in ("prepare", "generate", "filter"):
        assert started.count(stage) == 1, stage


def test_a_person_uses_the_console_in_a_browser(stack: ServiceStack, tmp_path: Path) -> None:
    """Chromium signs in, uploads, starts a job, watches it finish, reads the report, downloads
    the model and tries it; screenshots land in tmp_path."""
    use_the_console(stack, tmp_path)
