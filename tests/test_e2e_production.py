"""End to end in the production configuration: PostgreSQL, Redis, S3 (nanio), the API under
uvicorn and a prefork Celery worker, all real processes, driven over HTTP.

One stack per module (start-up is the slow part); each test creates its own job. The
visibility timeout is a few seconds so a killed worker's task comes back quickly.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.storage import ObjectStore
from tests.console_browser import use_the_console
from tests.processes import NanioServer, nanio_server
from tests.service_stack import (
    LONG_TRAINING,
    ServiceStack,
    create_job,
    events,
    flush_redis,
    postgres_database,
    production_env,
    run_full_loop,
    stage_started,
    synthetic_corpus,
    upload_corpus,
    wait_for_event,
    wait_for_job,
)
from worker.artifacts import partial_prefix, store_for

pytestmark = pytest.mark.slow

VISIBILITY_TIMEOUT_S = 6
STAGES = ("prepare", "generate", "filter", "distill", "evaluate")


@pytest.fixture(scope="module")
def nanio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NanioServer]:
    root = tmp_path_factory.mktemp("nanio")
    with nanio_server(root / "data", root / "logs") as server:
        yield server


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, nanio: NanioServer, model_store: Path
) -> Iterator[ServiceStack]:
    root = tmp_path_factory.mktemp("prod")
    flush_redis()
    with postgres_database() as database_url:
        env = production_env(root, database_url, nanio, model_store, VISIBILITY_TIMEOUT_S)
        stack = ServiceStack(env, root)
        try:
            stack.migrate_and_create_tenant()
            stack.start_api()
            stack.start_worker("worker-1")
            yield stack
        finally:
            stack.stop()
            flush_redis()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def corpus_id(stack: ServiceStack, corpus: Path) -> str:
    with stack.client() as client:
        return upload_corpus(client, corpus)["id"]


def _running_past_prepare(job: dict) -> bool:
    return job["status"] == "running" and job["stage"] in ("generate", "filter", "distill")


def test_full_loop_through_http(stack: ServiceStack, corpus: Path, tmp_path: Path) -> None:
    job_id = run_full_loop(stack, corpus, tmp_path)
    with stack.client() as client:
        timeline = events(client, job_id)
    finished = [
        e["stage"]
        for e in timeline
        if e["kind"] == "stage" and e["message"] == f"{e['stage']} finished"
    ]
    assert finished == list(STAGES)
    assert timeline[-1]["kind"] == "status" and timeline[-1]["data"]["status"] == "succeeded"
    assert any(e["kind"] == "progress" for e in timeline)


def test_a_job_trains_on_a_query_set_and_grades_none_of_its_queries(
    stack: ServiceStack, corpus: Path, corpus_id: str
) -> None:
    """The customer's own queries reach the worker through the object store: generate adds
    them, and a judged query that is one of them is left out of the evaluation."""

    documents = [json.loads(line) for line in corpus.open()][:6]
    texts = [" ".join(d["text"].split()[:6]) for d in documents]
    log = "".join(json.dumps({"_id": f"l{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    judged = "".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                     for i, t in enumerate([texts[0], "a question nobody logged"]))
    qrels = "".join(f"q{i}\t{documents[i]['_id']}\t1\n" for i in range(2))
    with stack.client() as client:
        query_set = client.post("/v1/query-sets", data={"corpus_id": corpus_id},
                                files={"queries": ("log.jsonl", log.encode())})
        assert query_set.status_code == 201, query_set.text
        eval_set = client.post("/v1/eval-sets", data={"corpus_id": corpus_id},
                               files={"queries": ("q.jsonl", judged.encode()),
                                      "qrels": ("qrels.tsv", qrels.encode())})
        assert eval_set.status_code == 201, eval_set.text
        job = create_job(client, corpus_id, query_set_id=query_set.json()["id"],
                         eval_set_id=eval_set.json()["id"])
        done = wait_for_job(client, job["id"], lambda j: j["status"] == "succeeded", 240, stack)
        generated = done["metrics"]["stages"]["generate"]["counts"]
        assert generated["per_type"]["supplied"] == 6
        report = client.get(f"/v1/jobs/{job['id']}/report").json()
        assert report["excluded_trained_queries"] == 1
        assert set(report["per_query"]) == {"q1"}


def test_cancel_of_a_running_job(stack: ServiceStack, corpus_id: str) -> None:
    with stack.client() as client:
        job = create_job(client, corpus_id)
        wait_for_job(client, job["id"], _running_past_prepare, 120, stack)
        response = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["status"] in ("cancelling", "cancelled")
        started = time.monotonic()
        done = wait_for_job(client, job["id"], lambda j: j["status"] == "cancelled", 60, stack)
        # The worker checks about once a second while a stage reports progress.
        assert time.monotonic() - started < 30
        assert done["finished_at"] is not None and done["model_id"] is None
        kinds = [(e["kind"], e["data"].get("status")) for e in events(client, job["id"])]
        assert kinds[-1] == ("status", "cancelled")


def test_revoke_with_terminate_cancels_and_the_worker_carries_on(
    stack: ServiceStack, corpus_id: str
) -> None:
    """revoke(terminate=True) SIGTERMs the pool process mid-stage: the job still ends
    `cancelled` and the worker replaces its pool process and keeps serving."""
    from celery import Celery
    from sqlalchemy import create_engine, text

    from app.settings import Settings
    from worker.celery_app import configure

    # A worker that reads the job's status only once an hour: the cooperative cancel check
    # cannot win the race, so the cancel must come from the terminate path.
    for worker in stack.workers:
        worker.stop(timeout=3)
    stack.start_worker("worker-slow-check", progress_interval_s="3600")
    engine = create_engine(stack.env["TAILOR_DATABASE_URL"])
    control = Celery("e2e-control")
    configure(control, Settings(broker_url=stack.env["TAILOR_BROKER_URL"],
                                broker_key_prefix=stack.env["TAILOR_BROKER_KEY_PREFIX"]))
    with stack.client() as client:
        # A long distill: after its first progress write the stage runs for seconds with no
        # status read (the hour-long interval), so only the terminate can end it.
        job = create_job(client, corpus_id, **LONG_TRAINING)
        wait_for_event(client, job["id"], stage_started("distill"), 120, stack)
        time.sleep(1.0)
        with engine.begin() as connection:
            # What a cancel endpoint that terminates would do: flag the row, then revoke.
            task_id = connection.execute(
                text(
                    "UPDATE jobs SET status = 'cancelling' WHERE id = :id RETURNING celery_task_id"
                ),
                {"id": job["id"]},
            ).scalar_one()
        control.control.revoke(task_id, terminate=True, signal="SIGTERM")
        wait_for_job(client, job["id"], lambda j: j["status"] == "cancelled", 60, stack)
        final = events(client, job["id"])[-1]
        # Recorded by the terminate path (worker main process or the dying pool process),
        # not by the once-a-second cooperative check.
        assert final["data"] == {"status": "cancelled"} and "terminated" in final["message"]
        assert stack.workers[-1].alive()
    engine.dispose()
    stack.workers[-1].stop(timeout=3)
    stack.start_worker("worker-after-revoke")


def _wait_for_object(store: ObjectStore, key: str, timeout: float, stack: ServiceStack) -> None:
    deadline = time.monotonic() + timeout
    while not store.exists(key):
        if time.monotonic() > deadline:
            raise AssertionError(f"{key} never appeared\n{stack.diagnostics()}")
        time.sleep(0.2)


def test_worker_killed_mid_job_resumes_on_a_new_worker(
    stack: ServiceStack, corpus_id: str, tmp_path: Path
) -> None:
    store = store_for(stack.settings())
    with stack.client() as client:
        job = create_job(client, corpus_id, **LONG_TRAINING)
        # Kill while training is under way, after its first epoch's state was mirrored.
        wait_for_event(client, job["id"], stage_started("distill"), 120, stack)
        _wait_for_object(store, f"{partial_prefix(job['id'], 'distill')}/fingerprint", 120, stack)
        # The machine dies: SIGKILL the worker and its pool process, nothing is acknowledged.
        for worker in stack.workers:
            if worker.alive():
                worker.kill()
        # The new worker is another host: an empty work folder, only the shared services.
        stack.start_worker("worker-2", work_dir=tmp_path / "host-2")
        done = wait_for_job(client, job["id"], lambda j: j["status"] == "succeeded", 180, stack)
        assert done["attempts"] > len(STAGES)  # at least one stage was delivered twice
        timeline = events(client, job["id"])
    # Training resumed from the mirrored state instead of starting again, and the mirror is gone.
    assert any(e["message"].startswith("resuming after epoch") for e in timeline), timeline
    assert not store.list(partial_prefix(job["id"], "distill") + "/")
    # The killed run had finished `resumed` epochs: the new one trained none of them again.
    resumed, after_resume = _epochs_after_resume(timeline)
    assert resumed >= 1 and after_resume, timeline
    assert min(after_resume) > resumed, (resumed, after_resume)

    def stage_events(stage: str, word: str) -> list[dict]:
        return [e for e in timeline if e["kind"] == "stage" and e["message"] == f"{stage} {word}"]

    # Stages finished before the crash were not run again: one start, one finish each.
    killed_in = "distill"
    for stage in STAGES[: STAGES.index(killed_in)]:
        assert len(stage_events(stage, "started")) == 1, stage
    # The stage the worker died in was delivered again, and every stage ran to the end once
    # (or was found already finished in the object store and skipped).
    assert len(stage_events(killed_in, "started")) >= 2
    assert any(e["data"].get("attempt", 0) >= 2 for e in stage_events(killed_in, "started"))
    for stage in STAGES:
        assert len(stage_events(stage, "finished")) <= 1
        assert stage_events(stage, "finished") or stage_events(stage, "skipped (already finished)")


def _epochs_after_resume(timeline: list[dict]) -> tuple[int, list[int]]:
    """The epoch the last resume started after, and the epochs the distill progress events
    after it report training ("epoch E step S/T ...")."""
    distill = [e for e in timeline if e["kind"] == "progress" and e["stage"] == "distill"]
    marks = [i for i, e in enumerate(distill) if e["message"].startswith("resuming after epoch")]
    resumed = int(distill[marks[-1]]["message"].rsplit(" ", 1)[1])
    trained = [re.match(r"epoch (\d+) step ", e["message"]) for e in distill[marks[-1] + 1:]]
    return resumed, [int(match[1]) for match in trained if match]


def test_a_lost_host_is_resumed_by_the_lease_sweep_before_the_broker_redelivers(
    stack: ServiceStack, corpus_id: str, tmp_path: Path
) -> None:
    """A host that vanishes mid-stage stops renewing its job's lease. The broker would give
    its task back only after the visibility timeout (an hour here): the lease sweep of any
    other worker re-sends the stage within about one lease period instead."""
    for worker in stack.workers:
        worker.stop(timeout=3)
    lease = {"lease_ttl_s": "3"}
    stack.start_worker("worker-lease-1", **lease)
    with stack.client() as client:
        job = create_job(client, corpus_id, **LONG_TRAINING)
        wait_for_event(client, job["id"], stage_started("distill"), 120, stack)
        stack.workers[-1].kill()
        # The other host never restores the lost task from the broker within this test.
        stack.start_worker(
            "worker-lease-2", work_dir=tmp_path / "host-2", visibility_timeout="3600", **lease
        )
        wait_for_job(client, job["id"], lambda j: j["status"] == "succeeded", 180, stack)
        timeline = events(client, job["id"])
    resent = [e for e in timeline if e["kind"] == "warning" and "lease" in e["message"]]
    assert len(resent) == 1 and resent[0]["stage"] == "distill", timeline
    starts = [e for e in timeline if e["kind"] == "stage" and e["message"] == "distill started"]
    assert len(starts) == 2
    stack.workers[-1].stop(timeout=3)
    stack.start_worker("worker-after-lease")


def test_a_stage_killed_every_time_fails_the_job_instead_of_running_for_ever(
    stack: ServiceStack, corpus_id: str
) -> None:
    """The out-of-memory killer SIGKILLs the pool process running a stage that needs more memory
    than the host has, on every delivery; the broker gives a lost task back with no count. The
    claim counts the losses: past TAILOR_MAX_STAGE_LOSSES the job fails, naming the setting
    that lowers the stage's memory, and the worker carries on."""
    import os
    import signal

    from sqlalchemy import create_engine, text

    for worker in stack.workers:
        worker.stop(timeout=3)
    stack.start_worker("worker-oom", max_stage_losses="1")
    engine = create_engine(stack.env["TAILOR_DATABASE_URL"])
    with stack.client() as client:
        job = create_job(client, corpus_id, **LONG_TRAINING)
        for attempt in (1, 2):
            wait_for_event(
                client, job["id"],
                lambda e, n=attempt: stage_started("distill")(e) and e["data"]["attempt"] == n,
                120, stack,
            )
            with engine.begin() as connection:  # the claim wrote the lease with the event
                holder = connection.execute(
                    text("SELECT lease_owner FROM jobs WHERE id = :id"), {"id": job["id"]}
                ).scalar_one()
            os.kill(int(holder.rsplit(":", 1)[1]), signal.SIGKILL)  # what the OOM killer does
        done = wait_for_job(client, job["id"], lambda j: j["status"] == "failed", 120, stack)
        timeline = events(client, job["id"])
    engine.dispose()
    assert done["error"]["error"] == "worker_lost" and done["error"]["stage"] == "distill"
    assert "lost 2 times" in done["error"]["detail"]
    assert "training.micro_batch_size" in done["error"]["detail"]
    starts = [e for e in timeline if e["kind"] == "stage" and e["message"] == "distill started"]
    lost = [e for e in timeline if e["kind"] == "warning" and "without finishing" in e["message"]]
    assert len(starts) == 2 and len(lost) == 1, timeline
    assert timeline[-1]["data"]["status"] == "failed" and timeline[-1]["data"]["losses"] == 2
    assert stack.workers[-1].alive()  # only its pool processes died
    stack.workers[-1].stop(timeout=3)
    stack.start_worker("worker-after-oom")


def test_a_person_uses_the_console_in_a_browser(stack: ServiceStack, tmp_path: Path) -> None:
    """Chromium signs in, uploads, starts a job, watches it finish, reads the report, downloads
    the model and tries it; screenshots land in tmp_path."""
    use_the_console(stack, tmp_path)
