"""The stage task's bookkeeping, run in-process against a real (SQLite) database, a local object
store and the filesystem broker: which deliveries run, how failures and cancels are recorded."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db.models import Corpus, Job, JobEvent, JobStatus, Tenant
from app.db.session import session_scope
from app.settings import get_settings
from ml_core.config import build_config


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Settings for this test's database, object folder and broker folder (migrated)."""
    from app.db.migrate import upgrade

    env = {
        "TAILOR_DATABASE_URL": f"sqlite:///{tmp_path / 'tailor.db'}",
        "TAILOR_OBJECT_STORE_URL": f"file://{tmp_path / 'objects'}",
        "TAILOR_BROKER_URL": "filesystem://",
        "TAILOR_BROKER_DIR": str(tmp_path / "broker"),
        "TAILOR_WORK_DIR": str(tmp_path / "work"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    upgrade(env["TAILOR_DATABASE_URL"])
    # The module-level Celery app was configured by whichever settings were first imported:
    # send this test's tasks through an app on this test's broker folder.
    import worker.dispatch
    from worker.celery_app import create_app

    monkeypatch.setattr(worker.dispatch, "celery_app", create_app(get_settings()))
    yield tmp_path
    get_settings.cache_clear()


def _job(status: JobStatus = JobStatus.QUEUED, stage: str | None = None) -> str:
    with session_scope() as session:
        session.add(Tenant(id="ten_1", name="t"))
        session.add(
            Corpus(
                id="crp_1",
                tenant_id="ten_1",
                name="c",
                filename="corpus.jsonl",
                object_key="corpora/crp_1/corpus.jsonl",
                size_bytes=1,
                sha256="0",
                documents=1,
            )
        )
        session.flush()
        session.add(
            Job(
                id="job_1",
                tenant_id="ten_1",
                corpus_id="crp_1",
                spec={},
                recipe=build_config().model_dump(mode="json"),
                status=status,
                stage=stage,
            )
        )
    return "job_1"


def _run(job_id: str, stage: str) -> str:
    from worker.tasks import run_stage

    return run_stage.apply(args=(job_id, stage)).get()


def _state(job_id: str) -> tuple[Job, list[JobEvent]]:
    with session_scope() as session:
        job = session.get(Job, job_id)
        events = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)))
        session.expunge_all()
    assert job is not None
    return job, events


def test_unexpected_error_fails_the_job_with_the_traceback_in_the_event_only(
    service: Path,
) -> None:
    job_id = _job()  # its corpus was never uploaded: the download fails
    assert _run(job_id, "prepare") == "failed"
    job, events = _state(job_id)
    assert job.status == JobStatus.FAILED and job.finished_at is not None
    assert job.error == {
        "error": "internal_error",
        "stage": "prepare",
        "detail": "the prepare stage failed unexpectedly",
    }
    failure = [e for e in events if e.data.get("status") == "failed"][0]
    assert "Traceback" in failure.data["traceback"] and failure.data["exception"]


def test_stage_error_is_reported_with_its_message(service: Path) -> None:
    job_id = _job(JobStatus.RUNNING, stage="prepare")
    # generate before prepare has finished: ml_core refuses with a StageError.
    assert _run(job_id, "generate") == "failed"
    job, _ = _state(job_id)
    assert job.error is not None and job.error["error"] == "stage_failed"
    assert "prepare" in job.error["detail"]


def test_cancelling_job_is_cancelled_without_running(service: Path) -> None:
    job_id = _job(JobStatus.CANCELLING, stage="generate")
    assert _run(job_id, "generate") == "dropped"
    job, events = _state(job_id)
    assert job.status == JobStatus.CANCELLED and job.finished_at is not None
    assert events[-1].data == {"status": "cancelled"}


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_finished_jobs_are_left_alone(service: Path, status: JobStatus) -> None:
    job_id = _job(status, stage="evaluate")
    assert _run(job_id, "evaluate") == "dropped"
    assert _state(job_id)[0].status == status


def test_stale_redelivery_of_an_earlier_stage_is_dropped(service: Path) -> None:
    job_id = _job(JobStatus.RUNNING, stage="distill")
    assert _run(job_id, "generate") == "dropped"
    job, events = _state(job_id)
    assert job.status == JobStatus.RUNNING and job.stage == "distill" and not events


def test_progress_reporter_throttles_and_raises_on_cancel(service: Path) -> None:
    from app.jobs.lifecycle import JobCancelled
    from worker.progress import ProgressReporter

    job_id = _job(JobStatus.RUNNING, stage="filter")
    # A minute's throttle: on a loaded machine the first write alone can take over a second.
    report = ProgressReporter(job_id, "filter", interval_s=60)
    report(0.5, "scoring")  # written: overall = 0.35 + 0.25 * 0.5
    report(0.9, "scoring")  # within the interval: not written
    job, events = _state(job_id)
    assert job.progress == pytest.approx(0.475)
    assert [e.message for e in events] == ["scoring"]
    with session_scope() as session:
        session.get(Job, job_id).status = JobStatus.CANCELLING  # type: ignore[union-attr]
    report._last_write -= 60  # a minute later
    with pytest.raises(JobCancelled):
        report(0.95, "scoring")


def test_embedded_worker_resends_jobs_left_running(service: Path) -> None:
    from worker.signals import _recover_embedded_jobs

    _job(JobStatus.RUNNING, stage="distill")
    _recover_embedded_jobs()
    messages = list((service / "broker" / "queue").glob("*.msg"))
    assert len(messages) == 1 and messages[0].name.endswith(".gpu.msg")
    body = json.loads(messages[0].read_text())
    assert body["headers"]["argsrepr"] == "('job_1', 'distill')"


@pytest.mark.parametrize("outcome", ["failure", "cancel"])
def test_an_outcome_the_database_refused_is_retried_not_lost(
    service: Path, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    # The database goes away just when the stage's outcome is written. Acknowledging the task
    # then would leave the job `running` with nothing to ever finish it: the task is sent
    # again, and the retry records the outcome once the database answers.
    from sqlalchemy.exc import OperationalError

    import worker.tasks as tasks
    from app.jobs.lifecycle import JobCancelled

    refused: list[str] = []
    writer = "_record_failure" if outcome == "failure" else "_record_cancel"
    real = getattr(tasks, writer)

    def down_once(*args: object, **kwargs: object) -> object:
        if not refused:
            refused.append(writer)
            raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, writer, down_once)
    monkeypatch.setattr(tasks, "RECORD_RETRY_S", 0)
    if outcome == "failure":
        job_id = _job()  # its corpus was never uploaded: prepare fails
    else:
        job_id = _job(JobStatus.RUNNING, stage="prepare")

        def cancel_mid_stage(self: object) -> str:
            raise JobCancelled(job_id)

        monkeypatch.setattr(tasks.StageRun, "run", cancel_mid_stage)
    result = tasks.run_stage.apply(args=(job_id, "prepare"))
    assert refused == [writer]
    job, events = _state(job_id)
    if outcome == "failure":
        assert job.status == JobStatus.FAILED and job.error is not None
    else:
        # The retried delivery finds the row `running` and JobCancelled again from the stage.
        assert job.status == JobStatus.CANCELLED
    # Eager mode runs the retry inline; its outcome is the task's.
    assert result.get() == ("failed" if outcome == "failure" else "cancelled")


def _hold_lease(job_id: str, owner: str, seconds: float) -> None:
    from datetime import timedelta

    from app.db.base import utcnow

    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.lease_owner, job.lease_expires_at = owner, utcnow() + timedelta(seconds=seconds)


def test_a_second_copy_of_a_running_stage_waits_for_a_live_holder(service: Path) -> None:
    import socket
    import subprocess
    import sys

    from app.jobs.lifecycle import StageBusy
    from worker.leases import _process_alive, lease_owner
    from worker.stage_run import claim

    job_id = _job(JobStatus.RUNNING, stage="distill")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # A live process on this host holds the stage: the second copy must not start.
        _hold_lease(job_id, f"{socket.gethostname()}:{holder.pid}", 300)
        with pytest.raises(StageBusy):
            claim(job_id, "distill", True, lease_owner())
        job, events = _state(job_id)
        assert job.lease_owner == f"{socket.gethostname()}:{holder.pid}" and not events
        # Killed and not yet reaped (a zombie): gone, the lease is taken over at once.
        holder.kill()
        deadline = time.monotonic() + 10
        while _process_alive(holder.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _process_alive(holder.pid)
        assert claim(job_id, "distill", True, lease_owner()) is not None
        assert _state(job_id)[0].lease_owner == lease_owner()
    finally:
        holder.kill()
        holder.wait()
    # On another host only the heartbeat tells: live until it lapses.
    _hold_lease(job_id, "another-host:1", 300)
    with pytest.raises(StageBusy):
        claim(job_id, "distill", True, lease_owner())
    _hold_lease(job_id, "another-host:1", -1)
    assert claim(job_id, "distill", True, lease_owner()) is not None
    # A copy of a stage the job is not running yet is not held up by the lease.
    _hold_lease(job_id, "another-host:1", 300)
    with session_scope() as session:
        session.get(Job, job_id).stage = "filter"  # type: ignore[union-attr]
    assert claim(job_id, "distill", False, lease_owner()) is not None


def test_a_busy_delivery_runs_once_the_holder_is_gone(
    service: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import subprocess
    import sys

    import worker.tasks as tasks

    job_id = _job(JobStatus.RUNNING, stage="prepare")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    _hold_lease(job_id, f"{socket.gethostname()}:{holder.pid}", 300)
    waits: list[float] = []

    def holder_dies_while_we_wait(settings: object) -> float:
        holder.kill()
        holder.wait()
        waits.append(1.0)
        return 0.0

    monkeypatch.setattr(tasks, "lease_wait_s", holder_dies_while_we_wait)
    # Eager mode runs the retry inline: busy once, then the stage runs (and fails: its corpus
    # was never uploaded), started exactly once.
    assert _run(job_id, "prepare") == "failed"
    assert waits == [1.0]
    job, events = _state(job_id)
    assert job.status == JobStatus.FAILED
    assert [e.message for e in events].count("prepare started") == 1


def test_a_stage_that_lost_its_lease_stops_and_the_heartbeat_renews_it(service: Path) -> None:
    from worker.leases import LeaseKeeper, LeaseLost
    from worker.progress import ProgressReporter

    job_id = _job(JobStatus.RUNNING, stage="filter")
    _hold_lease(job_id, "host:1", 1)
    keeper = LeaseKeeper(job_id, "host:1", ttl_s=0.25)
    before = _state(job_id)[0].lease_expires_at
    with keeper:  # beats every 0.05 s
        deadline = time.monotonic() + 10
        while _state(job_id)[0].lease_expires_at == before and time.monotonic() < deadline:
            time.sleep(0.05)
    assert _state(job_id)[0].lease_expires_at != before
    ProgressReporter(job_id, "filter", owner="host:1")(0.5, "scoring")  # still ours
    # Taken over by another delivery (our heartbeat lapsed): renewing fails, progress stops us.
    _hold_lease(job_id, "host:2", 300)
    assert not keeper.renew()
    with pytest.raises(LeaseLost):
        ProgressReporter(job_id, "filter", owner="host:1")(0.6, "scoring")
    assert _state(job_id)[0].status == JobStatus.RUNNING


def test_a_stage_whose_lease_lapsed_is_sent_again_once(service: Path) -> None:
    from app.db.base import utcnow
    from worker.leases import REQUEUED, lease_owner, sweep_lapsed_leases
    from worker.stage_run import claim

    queue = service / "broker" / "queue"
    job_id = _job(JobStatus.RUNNING, stage="filter")
    _hold_lease(job_id, "lost-host:7", 300)  # renewed lately: left alone
    assert sweep_lapsed_leases(300) == [] and not list(queue.glob("*.msg"))
    _hold_lease(job_id, "lost-host:7", -1)  # the host stopped renewing: sent again, once
    assert sweep_lapsed_leases(300) == [job_id]
    assert sweep_lapsed_leases(300) == []  # another worker's sweep a moment later
    messages = list(queue.glob("*.msg"))
    assert len(messages) == 1
    headers = json.loads(messages[0].read_text())["headers"]
    assert headers["argsrepr"] == "('job_1', 'filter')"
    job, events = _state(job_id)
    assert job.lease_owner == f"{REQUEUED}:1" and job.celery_task_id == headers["id"]
    assert [e.kind.value for e in events] == ["warning"] and "lost-host:7" in events[0].message
    # No task took the re-sent stage within a lease period (a long queue, or the task was
    # lost): sent again, and the next check waits twice as long, then four times.
    for resends, factor in ((2, 2), (3, 4)):
        _hold_lease(job_id, _state(job_id)[0].lease_owner, -1)
        before = utcnow()
        assert sweep_lapsed_leases(300) == [job_id]
        job, events = _state(job_id)
        assert job.lease_owner == f"{REQUEUED}:{resends}"
        wait_s = (job.lease_expires_at - before).total_seconds()
        assert 300 * factor - 5 < wait_s <= 300 * factor + 5
        assert f"sent again {resends - 1} time(s)" in events[-1].message
        assert sweep_lapsed_leases(300) == []
    assert len(list(queue.glob("*.msg"))) == 3
    # The re-sent task takes the stage at once: nobody holds a requeued lease.
    assert claim(job_id, "filter", False, lease_owner()) is not None
    assert _state(job_id)[0].lease_owner == lease_owner()
    # Jobs between stages (no lease) and finished jobs are not swept.
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.lease_owner, job.lease_expires_at = None, None
    assert sweep_lapsed_leases(300) == []
    _hold_lease(job_id, "lost-host:7", -1)
    with session_scope() as session:
        session.get(Job, job_id).status = JobStatus.FAILED  # type: ignore[union-attr]
    assert sweep_lapsed_leases(300) == []
    assert len(list(queue.glob("*.msg"))) == 3


def test_only_the_sweeps_own_markers_count_as_re_sends() -> None:
    from worker.leases import requeues

    assert [requeues(h) for h in ("requeued:3", "requeued", None, "requeued-host:5", "h:1")] == [
        3, 1, 0, 0, 0,  # "requeued" alone: written before re-sends were counted
    ]


def test_transient_errors_are_retried_three_times_and_leave_no_lease(
    service: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.tasks as tasks
    from worker.leases import lease_owner

    job_id = _job(JobStatus.RUNNING, stage="filter")
    calls: list[str | None] = []

    def broker_down(self: object) -> str:
        calls.append(_state(job_id)[0].lease_owner)  # held while the stage runs
        raise ConnectionError("connection refused")

    monkeypatch.setattr(tasks.StageRun, "run", broker_down)
    assert _run(job_id, "filter") == "failed"  # eager mode runs the retries inline
    assert calls == [lease_owner()] * (1 + tasks.TRANSIENT_RETRIES)
    job, _ = _state(job_id)
    assert job.status == JobStatus.FAILED and job.error is not None
    # Each attempt gave its lease back on the way out: a retry on another process of this
    # host need not wait for it to lapse.
    assert job.lease_owner is None and job.lease_expires_at is None


def test_waiting_on_a_busy_stage_does_not_use_up_its_transient_retries(
    service: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.tasks as tasks

    job_id = _job(JobStatus.RUNNING, stage="filter")
    _hold_lease(job_id, "another-host:1", 300)
    waits: list[int] = []

    def holder_finishes_after_four_waits(settings: object) -> float:
        waits.append(1)
        if len(waits) == 4:
            _hold_lease(job_id, "another-host:1", -1)  # it stopped renewing
        return 0.0

    runs: list[int] = []

    def broker_down(self: object) -> str:
        runs.append(1)
        raise ConnectionError("connection refused")

    monkeypatch.setattr(tasks, "lease_wait_s", holder_finishes_after_four_waits)
    monkeypatch.setattr(tasks.StageRun, "run", broker_down)
    assert _run(job_id, "filter") == "failed"
    assert len(waits) == 4 and len(runs) == 1 + tasks.TRANSIENT_RETRIES


def test_a_copy_that_lost_its_lease_publishes_nothing(
    service: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stage ran to its end without a progress report after the takeover (a long step, a
    # database outage): the check before uploading still stops it, leaving the row and the
    # object store to the copy that took over.
    import worker.stage_run as stage_run

    job_id = _job(JobStatus.RUNNING, stage="prepare")
    uploads: list[str] = []

    def stage_outlives_its_lease(stage: str, ctx: object) -> object:
        _hold_lease(job_id, "another-host:1", 300)  # the sweep re-sent it; the copy took over
        return None

    monkeypatch.setattr(stage_run, "run_pipeline_stage", stage_outlives_its_lease)
    monkeypatch.setattr(stage_run, "upload_stage", lambda *args: uploads.append("uploaded"))
    corpus = service / "objects" / "corpora" / "crp_1" / "corpus.jsonl"
    corpus.parent.mkdir(parents=True)
    corpus.write_text('{"_id": "d1", "text": "a passage"}\n')
    assert _run(job_id, "prepare") == "superseded"
    job, events = _state(job_id)
    assert not uploads and job.status == JobStatus.RUNNING
    assert job.lease_owner == "another-host:1"  # not released by the copy that lost it
    assert [e.message for e in events] == ["prepare started"]


def test_a_stage_stopped_by_a_shutdown_is_swept_up_at_once(service: Path) -> None:
    # A cold shutdown (SystemExit in the pool process) leaves the task unacknowledged for the
    # broker to redeliver, hours later: the lease lapses at once, so the next sweep re-sends.
    from worker.leases import LeaseKeeper, lease_owner, sweep_lapsed_leases
    from worker.stage_run import claim

    job_id = _job(JobStatus.RUNNING, stage="distill")
    assert claim(job_id, "distill", False, lease_owner(), 300) is not None
    with pytest.raises(SystemExit), LeaseKeeper(job_id, lease_owner(), 300):
        raise SystemExit(1)
    job, _ = _state(job_id)
    assert job.lease_owner == lease_owner()  # kept, but lapsed
    assert sweep_lapsed_leases(300) == [job_id]
    # The pool process said it was shut down, not lost: its stage's next delivery runs even
    # with no loss allowed.
    from worker.tasks import _on_terminated

    _on_terminated(job_id, "distill")
    assert claim(job_id, "distill", True, "another-host:2", 300, max_losses=0) is not None
    job, events = _state(job_id)
    assert job.status == JobStatus.RUNNING and job.lease_owner == "another-host:2"
    assert not [e for e in events if "without finishing" in e.message]


def test_deliberate_errors_fail_the_job_with_their_own_code(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from ml_core.config import RecipeConfig
    from ml_core.corpus import CorpusError
    from ml_core.pipeline import StageError
    from ml_core.registry import ModelRegistry, UnknownModel
    from worker.tasks import error_code

    with pytest.raises(UnknownModel) as unknown:
        ModelRegistry(tmp_path).get("no-such-model")
    assert isinstance(unknown.value, KeyError)  # callers that catch KeyError still do
    assert str(unknown.value).startswith("unknown model 'no-such-model'")
    with pytest.raises(ValidationError) as invalid:
        RecipeConfig.model_validate({"training": {"no_such_knob": 1}})
    deliberate = [CorpusError("c.jsonl", 3, "text", "empty"), StageError("nothing left"),
                  unknown.value, invalid.value]
    assert [error_code(e) for e in deliberate] == [
        "invalid_corpus", "stage_failed", "unknown_model", "invalid_recipe",
    ]
    # A stray KeyError that merely mentions a model is a bug to report as internal.
    assert error_code(KeyError("model_type")) is None
    assert error_code(RuntimeError("boom")) is None


def test_an_allocation_that_fails_names_the_setting_that_lowers_the_stages_memory(
    service: Path,
) -> None:
    import torch

    from worker.tasks import _record_failure, out_of_memory

    job_id = _job(JobStatus.RUNNING, stage="distill")
    # 4 EiB, past any 64-bit machine's address space (57-bit paging included): the allocators
    # really refuse, whatever the kernel's overcommit policy.
    with pytest.raises(RuntimeError) as refused:
        torch.empty(2**62, dtype=torch.uint8)
    with pytest.raises(MemoryError) as python:
        bytearray(2**62)
    assert out_of_memory(refused.value) and out_of_memory(python.value)
    assert not out_of_memory(RuntimeError("boom")) and not out_of_memory(ValueError("memory"))
    _record_failure(job_id, "distill", refused.value)
    job, events = _state(job_id)
    assert job.error == {
        "error": "out_of_memory",
        "stage": "distill",
        "detail": "the distill stage ran out of memory. Lower training.micro_batch_size "
                  "(gradients are the same at any micro-batch size), or run it on a worker "
                  "with more memory.",
    }
    failed = [e for e in events if e.data.get("status") == "failed"][-1]
    assert failed.data["exception"] == "RuntimeError"
    assert "can't allocate memory" in failed.data["message"]


def test_an_invalid_corpus_fails_the_job_naming_its_line(service: Path) -> None:
    job_id = _job()
    corpus = service / "objects" / "corpora" / "crp_1" / "corpus.jsonl"
    corpus.parent.mkdir(parents=True)
    corpus.write_text('{"_id": "d1", "text": "a passage"}\n{"_id": "d2"}\n')
    assert _run(job_id, "prepare") == "failed"
    job, events = _state(job_id)
    assert job.error is not None and job.error["error"] == "invalid_corpus"
    assert "line 2" in job.error["detail"] and "text" in job.error["detail"]
    assert events[-1].data["exception"] == "CorpusError" and "traceback" not in events[-1].data


def test_a_bulk_embedding_job_whose_lease_lapsed_is_sent_again_to_the_gpu_queue(
    service: Path,
) -> None:
    """The sweep covers both kinds of job: a lapsed bulk embedding gets its own task again,
    on the gpu queue, and its timeline (not a training job's) records why."""
    from app.db.base import utcnow
    from app.db.models import EmbeddingJob, EmbeddingJobEvent
    from worker.celery_app import TASK_EMBED_CORPUS
    from worker.leases import sweep_lapsed_leases

    _job()
    with session_scope() as session:
        session.add(EmbeddingJob(id="emb_1", tenant_id="ten_1", corpus_id="crp_1",
                                 model="tiny-student", spec={}, status=JobStatus.RUNNING,
                                 stage="embed", lease_owner="lost-host:7",
                                 lease_expires_at=utcnow()))
    assert sweep_lapsed_leases(300) == ["emb_1"]
    messages = list((service / "broker" / "queue").glob("*.msg"))
    assert [m.name.rpartition(".")[0].rpartition(".")[2] for m in messages] == ["gpu"]
    headers = json.loads(messages[0].read_text())["headers"]
    assert (headers["task"], headers["argsrepr"]) == (TASK_EMBED_CORPUS, "('emb_1',)")
    with session_scope() as session:
        job = session.get(EmbeddingJob, "emb_1")
        assert job is not None and job.celery_task_id == headers["id"]
        events = list(session.scalars(select(EmbeddingJobEvent)))
        assert [e.message for e in events] == [
            "embed stopped renewing its lease (lost-host:7); sending it again"]
        assert not list(session.scalars(select(JobEvent)))
