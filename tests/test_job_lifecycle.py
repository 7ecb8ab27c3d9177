"""The job lifecycle both the API and the worker write through, against a real (SQLite) database:
which transitions happen, which are refused, and what each leaves on the job's timeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import (
    Corpus,
    EventKind,
    Job,
    JobEvent,
    JobStatus,
    Recommendation,
    Tenant,
    TunedModel,
)
from app.db.session import session_scope
from app.jobs import lifecycle
from app.settings import get_settings

STAGES = ("prepare", "generate", "filter", "distill", "evaluate")


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from app.db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'tailor.db'}"
    monkeypatch.setenv("TAILOR_DATABASE_URL", url)
    get_settings.cache_clear()
    upgrade(url)
    with session_scope() as session:
        session.add(Tenant(id="ten_1", name="t"))
        session.add(
            Corpus(id="crp_1", tenant_id="ten_1", name="c", filename="corpus.jsonl",
                   object_key="corpora/crp_1/corpus.jsonl", size_bytes=1, sha256="0", documents=1)
        )
    yield
    get_settings.cache_clear()


def _new_job(status: JobStatus | None = None, stage: str | None = None) -> str:
    with session_scope() as session:
        job = Job(id="job_1", tenant_id="ten_1", corpus_id="crp_1", spec={}, recipe={})
        session.add(job)
        lifecycle.mark_queued(session, job)
        if status is not None:
            job.status, job.stage = status, stage
    return "job_1"


def _state(job_id: str) -> tuple[Job, list[JobEvent]]:
    with session_scope() as session:
        job = session.get(Job, job_id)
        events = list(
            session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        )
        session.expunge_all()
    assert job is not None
    return job, events


def _claim(
    session: Session, stage: str, owner: str = "host:1", busy: bool = False,
    max_losses: int | None = None,
) -> Job | None:
    return lifecycle.claim_stage(
        session, "job_1", stage, stages=STAGES, progress=0.1 * STAGES.index(stage), owner=owner,
        lease_ttl_s=60, redelivered=False, held_elsewhere=lambda job: busy, max_losses=max_losses,
    )


@pytest.mark.parametrize(
    ("before", "accepted", "after", "message"),
    [
        (JobStatus.QUEUED, True, JobStatus.CANCELLED, "cancelled before it started"),
        (JobStatus.RUNNING, True, JobStatus.CANCELLING, "cancellation requested"),
        (JobStatus.CANCELLING, True, JobStatus.CANCELLING, None),
        (JobStatus.SUCCEEDED, False, JobStatus.SUCCEEDED, None),
        (JobStatus.FAILED, False, JobStatus.FAILED, None),
        (JobStatus.CANCELLED, False, JobStatus.CANCELLED, None),
    ],
)
def test_a_cancel_request_follows_the_jobs_state(
    database: None, before: JobStatus, accepted: bool, after: JobStatus, message: str | None
) -> None:
    job_id = _new_job(before)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert lifecycle.request_cancel(session, job) is accepted
    job, events = _state(job_id)
    assert job.status == after
    assert (job.finished_at is not None) == (before == JobStatus.QUEUED)  # cancelled here
    expected = ["queued"] + ([message] if message else [])
    assert [e.message for e in events] == expected
    assert events[-1].data == {"status": after.value if message else "queued"}


def test_a_stage_is_claimed_recorded_and_handed_on(database: None) -> None:
    job_id = _new_job()
    with session_scope() as session:
        job = _claim(session, "prepare")
        assert job is not None and job.status == JobStatus.RUNNING
    with session_scope() as session:  # a redelivery of the same stage: a second attempt
        assert _claim(session, "prepare") is not None
    with session_scope() as session:
        outcome = lifecycle.StageOutcome(skipped=False, counts={"passages": 3}, metrics={},
                                         seconds=1.5)
        lifecycle.record_stage(session, job_id, "prepare", outcome, progress=0.05)
        lifecycle.advance(session, job_id, "generate", "task-2")
    job, events = _state(job_id)
    assert (job.stage, job.celery_task_id, job.attempts) == ("generate", "task-2", 2)
    assert job.lease_owner == "host:1" and job.progress == pytest.approx(0.05)
    assert job.metrics == {"stages": {"prepare": {"counts": {"passages": 3}, "metrics": {},
                                                  "seconds": 1.5}}}
    assert [(e.message, e.data.get("attempt")) for e in events] == [
        ("queued", None), ("running", None), ("prepare started", 1), ("prepare started", 2),
        ("prepare finished", None),
    ]
    with session_scope() as session:
        assert _claim(session, "prepare") is None  # stale: the job has moved past it
        with pytest.raises(lifecycle.StageBusy):
            _claim(session, "generate", busy=True)
    assert _state(job_id)[0].stage == "generate"


def test_a_claim_of_a_cancelling_job_cancels_it_and_runs_nothing(database: None) -> None:
    job_id = _new_job(JobStatus.CANCELLING, stage="filter")
    with session_scope() as session:
        assert _claim(session, "filter") is None
    job, events = _state(job_id)
    assert job.status == JobStatus.CANCELLED and job.lease_owner is None
    assert (events[-1].message, events[-1].stage) == ("cancelled before filter", "filter")


def test_finished_jobs_are_never_rewritten(database: None) -> None:
    job_id = _new_job(JobStatus.RUNNING, stage="distill")
    with session_scope() as session:
        assert lifecycle.cancel(session, job_id, "distill", "cancelled during distill")
    with session_scope() as session:
        # A failure (or a second cancel) arriving after the cancel leaves the job cancelled.
        lifecycle.fail(session, job_id, "distill", "stage_failed", "late", {})
        assert not lifecycle.cancel(session, job_id, "distill", "again")
        with pytest.raises(lifecycle.JobCancelled):
            lifecycle.succeed(session, job_id, _model(), {"recommended": "tuned"})
    job, events = _state(job_id)
    assert job.status == JobStatus.CANCELLED and job.error is None
    assert [e.message for e in events] == ["queued", "cancelled during distill"]


def test_a_stopped_task_cancels_only_a_job_whose_cancel_was_requested(database: None) -> None:
    # A terminated task is a cancel only when one was asked for; otherwise it is a shutdown,
    # and the job waits for its stage to be delivered again.
    job_id = _new_job(JobStatus.RUNNING, stage="distill")
    with session_scope() as session:
        assert not lifecycle.cancel(session, job_id, "distill", "stopped", requested_only=True)
    assert _state(job_id)[0].status == JobStatus.RUNNING
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and lifecycle.request_cancel(session, job)
    with session_scope() as session:
        assert lifecycle.cancel(session, job_id, "distill", "stopped", requested_only=True)
    assert _state(job_id)[0].status == JobStatus.CANCELLED


def test_a_stage_whose_process_keeps_dying_fails_the_job_after_the_losses_allowed(
    database: None,
) -> None:
    # Each claim by another process while the last one's lease was never given back is a
    # delivery lost without a word (SIGKILL: the out-of-memory killer, a lost host).
    job_id = _new_job()
    with session_scope() as session:
        assert _claim(session, "distill", owner="host:1", max_losses=2) is not None
    for owner in ("host:2", "host:3"):
        with session_scope() as session:
            assert _claim(session, "distill", owner=owner, max_losses=2) is not None
    job, events = _state(job_id)
    assert job.status == JobStatus.RUNNING and job.lease_owner == "host:3"
    lost = [e for e in events if e.kind == EventKind.WARNING]
    assert [(e.stage, e.data) for e in lost] == [
        ("distill", {"lease_owner": "host:1", "losses": 1}),
        ("distill", {"lease_owner": "host:2", "losses": 2}),
    ]
    assert lost[1].message == (
        "distill stopped without finishing (its process was killed or its host lost); "
        "running it again (2 of the 2 losses allowed)"
    )
    with session_scope() as session:  # the third loss: the job fails, nothing runs
        assert _claim(session, "distill", owner="host:4", max_losses=2) is None
    job, events = _state(job_id)
    assert job.status == JobStatus.FAILED and job.finished_at is not None
    assert job.error is not None and job.error["error"] == "worker_lost"
    assert job.error["stage"] == "distill"
    assert "lost 3 times" in job.error["detail"]
    assert "Lower training.micro_batch_size" in job.error["detail"]
    assert events[-1].data == {"status": "failed", "error": "worker_lost",
                               "lease_owner": "host:3", "losses": 3}
    assert [e.data.get("attempt") for e in events if e.kind == EventKind.STAGE] == [1, 2, 3]
    with session_scope() as session:  # a late delivery of the failed job runs nothing
        assert _claim(session, "distill", owner="host:5", max_losses=2) is None
    assert _state(job_id)[0].error == job.error


def test_the_memory_advice_names_settings_the_recipe_has() -> None:
    from ml_core.config import RecipeConfig
    from ml_core.pipeline import STAGES as PIPELINE_STAGES

    assert set(lifecycle.MEMORY_SETTINGS) <= set(PIPELINE_STAGES)
    for advice in lifecycle.MEMORY_SETTINGS.values():
        section, name = advice.split()[0].split(".")
        assert name in RecipeConfig.model_fields[section].annotation.model_fields, advice


def test_released_interrupted_and_own_deliveries_are_not_losses(database: None) -> None:
    # With no loss allowed, any miscount would fail the job.
    job_id = _new_job()
    with session_scope() as session:
        assert _claim(session, "generate", owner="host:1", max_losses=0) is not None
    with session_scope() as session:  # the stage raised (a retry follows): lease given back
        job = session.get(Job, job_id)
        assert job is not None
        job.lease_owner, job.lease_expires_at = None, None
    with session_scope() as session:
        assert _claim(session, "generate", owner="host:2", max_losses=0) is not None
    with session_scope() as session:  # the same process again: it was never lost
        assert _claim(session, "generate", owner="host:2", max_losses=0) is not None
    with session_scope() as session:  # its worker shut down under it (cold shutdown)
        lifecycle.interrupted(session, job_id, "generate")
    with session_scope() as session:
        assert _claim(session, "generate", owner="host:3", max_losses=0) is not None
    job, events = _state(job_id)
    assert job.status == JobStatus.RUNNING and job.error is None
    assert [e.message for e in events if e.kind == EventKind.WARNING] == [
        "generate interrupted: its worker shut down, and another delivery runs it again"
    ]
    with session_scope() as session:  # but a loss after the interruption counts
        job = _claim(session, "generate", owner="host:4", max_losses=0)
    assert job is None
    failed, _ = _state(job_id)
    assert failed.error is not None and "Lower generation.batch_size" in failed.error["detail"]


def test_a_failure_reads_the_same_from_the_api_and_the_worker(database: None) -> None:
    job_id = _new_job(JobStatus.RUNNING, stage="filter")
    with session_scope() as session:
        lifecycle.fail(session, job_id, "filter", "stage_failed", "no query survived",
                       {"exception": "StageError"})
    job, events = _state(job_id)
    assert job.status == JobStatus.FAILED and job.finished_at is not None
    assert job.error == {"error": "stage_failed", "detail": "no query survived", "stage": "filter"}
    assert events[-1].data == {"status": "failed", "error": "stage_failed",
                               "exception": "StageError"}
    with session_scope() as session:
        queued = Job(id="job_2", tenant_id="ten_1", corpus_id="crp_1", spec={}, recipe={})
        session.add(queued)
        lifecycle.mark_queued(session, queued)
        lifecycle.fail_enqueue(session, queued, ConnectionError("broker down"))
    job, events = _state("job_2")
    assert job.status == JobStatus.FAILED
    assert job.error == {"error": "enqueue_failed", "detail": "ConnectionError: broker down",
                         "stage": "prepare"}
    assert events[-1].data == {"status": "failed"}


def _model() -> TunedModel:
    return TunedModel(id="mdl_1", tenant_id="ten_1", job_id="job_1", name="m", base_model="s",
                      object_key="models/mdl_1/model.tar.gz", folder_key="models/mdl_1/model/",
                      dim=8, metrics={}, recommended=False)


def test_success_records_the_model_and_warns_when_the_base_stays(database: None) -> None:
    job_id = _new_job(JobStatus.RUNNING, stage="evaluate")
    report = {"recommended": "base", "gain": {"ndcg@10": -0.01}, "tuned": {"ndcg@10": 0.3},
              "warnings": [], "unrelated": 1}
    with session_scope() as session:
        lifecycle.succeed(session, job_id, _model(), report)
    job, events = _state(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.progress == 1.0
    assert job.recommended == Recommendation.BASE
    assert job.metrics == {"gain": {"ndcg@10": -0.01}, "tuned": {"ndcg@10": 0.3}, "warnings": []}
    assert [e.kind.value for e in events[-2:]] == ["warning", "status"]
    assert "does not beat its base model" in events[-2].message
    assert events[-1].data == {"status": "succeeded", "model_id": "mdl_1", "recommended": "base"}
    with session_scope() as session:
        model = session.get(TunedModel, "mdl_1")
        assert model is not None and model.job_id == job_id


@pytest.mark.parametrize(
    ("modules", "kept_out"),
    [
        # Shared by the API and the worker: only the database layer, no ML, no web framework.
        ("app.jobs.lifecycle", ("fastapi", "starlette", "ml_core", "celery")),
        # The worker never imports the API's HTTP layer.
        ("worker.tasks, worker.signals", ("fastapi", "starlette", "app.errors", "app.deps")),
    ],
)
def test_the_lifecycle_and_the_worker_stay_outside_the_http_layer(
    modules: str, kept_out: tuple[str, ...]
) -> None:
    import subprocess
    import sys

    code = (
        f"import sys, {modules}; "
        f"bad = [m for m in {kept_out!r} if m in sys.modules]; "
        "sys.exit(bool(bad) and print(bad))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
