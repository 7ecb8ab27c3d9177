"""A job's life, written once for the API and the worker alike.

    queued -> running (stage by stage) -> succeeded | failed
    queued -> cancelled             running -> cancelling -> cancelled

Every status write and every event on a job's timeline goes through here, for both kinds of
job: training jobs (`job_...`, stage by stage) and bulk embedding jobs (`emb_...`, one stage);
a job's id names its tables (app.db.models.job_tables). The functions work on the caller's
session and never commit: the API commits once per request, the worker in short transactions
(never one held across a stage). Each finish (succeeded, failed, cancelled) and each completed
stage also queues the tenant's webhooks in the same session (app.webhooks.events), so a change
and its event commit together whichever side made it. This module imports only the database
layer, so the worker uses it without importing the HTTP layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import (
    FINISHED_JOB_STATUSES,
    AnyJob,
    AnyJobEvent,
    EventKind,
    JobStatus,
    Recommendation,
    TunedModel,
    job_tables,
)
from app.ids import new_id
from app.webhooks import events as webhooks

log = logging.getLogger(__name__)

# The evaluate report's figures that become the job's own metrics.
REPORT_FIGURES = (
    "base",
    "tuned",
    "gain",
    "significance",
    "warnings",
    "per_query_type",
    "teacher_check",
    "judgements",
    "base_kept",
)


class JobCancelled(Exception):
    """The job was cancelled (or deleted) under a running stage: stop and publish nothing."""


class StageBusy(Exception):
    """This stage of the job is running in another live process (it holds the job's lease)."""


# Event texts after "<stage> " that the claim counts (so they are part of the timeline's format):
# a delivery whose process ended without a word (killed: most often for lack of memory, or its
# host lost), and one whose worker shut down under it (not counted against the stage).
LOST = "stopped without finishing"
INTERRUPTED = "interrupted: its worker shut down, and another delivery runs it again"
WORKER_LOST = "worker_lost"
# What lowers a stage's memory, named in the error of a job whose stage kept being killed.
MEMORY_SETTINGS = {
    "generate": "generation.batch_size",
    "filter": "candidates.teacher_batch_size",
    "distill": "training.micro_batch_size (gradients are the same at any micro-batch size)",
}


@dataclass(frozen=True)
class StageOutcome:
    """What a finished (or skipped) stage reports: its manifest's counts, metrics and time."""

    skipped: bool
    counts: dict[str, Any]
    metrics: dict[str, Any]
    seconds: float | None


def add_event(
    session: Session,
    job_id: str,
    kind: EventKind,
    message: str,
    *,
    stage: str | None = None,
    progress: float | None = None,
    data: dict[str, Any] | None = None,
) -> AnyJobEvent:
    """Append one event to a job's timeline."""
    _, event_model = job_tables(job_id)
    event = event_model(
        job_id=job_id, kind=kind, stage=stage, progress=progress, message=message, data=data or {}
    )
    session.add(event)
    return event


def locked_job(session: Session, job_id: str) -> AnyJob | None:
    """The job row, locked until the session commits: the worker reads it, decides and writes
    it back while the cancel endpoint's compare-and-set waits (FOR UPDATE on PostgreSQL; on
    SQLite the database's write lock, see app.db.session)."""
    model, _ = job_tables(job_id)
    return session.scalars(
        select(model).where(model.id == job_id).with_for_update()
    ).one_or_none()


# ---------------------------------------------------------------------------------------------
# The API's side: creation, a queue that refused the task, the cancel request


def mark_queued(session: Session, job: AnyJob) -> None:
    """A new job starts queued."""
    job.status = JobStatus.QUEUED
    _status_event(session, job, "queued")


def fail_enqueue(session: Session, job: AnyJob, error: Exception, stage: str = "prepare") -> None:
    """queued -> failed: the job's first task (of `stage`) could not be sent."""
    _fail(job, stage, "enqueue_failed", f"{type(error).__name__}: {error}")
    _status_event(session, job, "failed: the task could not be queued")
    webhooks.emit(session, job, webhooks.JOB_FAILED)
    session.flush()


def request_cancel(session: Session, job: AnyJob) -> bool:
    """Cancel on request: queued -> cancelled now, running -> cancelling (the worker stops the
    stage at its next check). False when the job had already finished."""
    if job.status == JobStatus.QUEUED and _compare_and_set(
        session, job, JobStatus.QUEUED, status=JobStatus.CANCELLED, finished_at=utcnow()
    ):
        _status_event(session, job, "cancelled before it started")
        webhooks.emit(session, job, webhooks.JOB_CANCELLED)
        session.flush()
        return True
    if job.status == JobStatus.RUNNING and _compare_and_set(
        session, job, JobStatus.RUNNING, status=JobStatus.CANCELLING
    ):
        _status_event(session, job, "cancellation requested")
        session.flush()
        return True
    if job.status == JobStatus.CANCELLING:
        return True
    if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
        # It moved on between our read and our update; decide again on the new state.
        return request_cancel(session, job)
    return False


def _compare_and_set(session: Session, job: AnyJob, source: JobStatus, **values: Any) -> bool:
    # On status: the worker updates the same row concurrently.
    model = type(job)
    result = session.execute(
        update(model)
        .where(model.id == job.id, model.status == source)
        .values(updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    session.refresh(job)
    return result.rowcount == 1  # type: ignore[attr-defined]


def _status_event(session: Session, job: AnyJob, message: str) -> None:
    add_event(
        session,
        job.id,
        EventKind.STATUS,
        message,
        stage=job.stage,
        progress=job.progress,
        data={"status": job.status.value},
    )


# ---------------------------------------------------------------------------------------------
# The worker's side: claim a stage, record it, advance, finish, fail, cancel


def claim_stage(
    session: Session,
    job_id: str,
    stage: str,
    *,
    stages: Sequence[str],
    progress: float,
    owner: str,
    lease_ttl_s: float,
    redelivered: bool,
    held_elsewhere: Callable[[AnyJob], bool],
    max_losses: int | None = None,
) -> AnyJob | None:
    """Decide whether this delivery of `stage` runs: mark the job running at `stage` (overall
    progress at least `progress`) with `owner` holding its lease, and return the locked row.

    None: nothing to do (the job is gone, finished, cancelled now, or past this stage, or it
    failed here because the stage's process was lost more than `max_losses` times).
    StageBusy: `held_elsewhere(job)` says another live process runs this stage; try later.
    """
    job = locked_job(session, job_id)
    if job is None:
        log.warning("job %s not found; dropping its %s task", job_id, stage)
        return None
    if job.status in FINISHED_JOB_STATUSES:
        log.info("job %s is %s; dropping its %s task", job_id, job.status, stage)
        return None
    if job.status == JobStatus.CANCELLING:
        _cancel(session, job, stage, "cancelled before " + stage)
        return None
    if job.stage in stages and stages.index(job.stage) > stages.index(stage):
        # A duplicate delivery of a stage the job has moved past (redelivered after the
        # visibility timeout while the first copy finished): the first copy already sent
        # the next stage, so this one must not.
        log.info("job %s is at %s; dropping stale %s task", job_id, job.stage, stage)
        return None
    if job.stage == stage and held_elsewhere(job):
        # A second copy of the stage that is running (redelivered after the visibility
        # timeout, or sent twice): running it too would share the work folder. Wait: it
        # is dropped as stale once the holder advances, and takes over if the holder dies.
        raise StageBusy(f"job {job_id} {stage} is running in {job.lease_owner}")
    if _previous_delivery_lost(session, job, stage, owner):
        if not _lost_again(session, job, stage, max_losses):
            return None
    first_start = job.status == JobStatus.QUEUED
    started = f"{stage} started"
    # Deliveries of this stage so far: more than one means a redelivery (crash, lost host).
    _, event_model = job_tables(job_id)
    attempt = 1 + (
        session.scalar(
            select(func.count())
            .select_from(event_model)
            .where(
                event_model.job_id == job_id,
                event_model.kind == EventKind.STAGE,
                event_model.stage == stage,
                event_model.message == started,
            )
        )
        or 0
    )
    job.status = JobStatus.RUNNING
    job.started_at = job.started_at or utcnow()
    job.attempts = (job.attempts or 0) + 1
    job.stage = stage
    job.lease_owner = owner or None
    job.lease_expires_at = utcnow() + timedelta(seconds=lease_ttl_s) if owner else None
    job.progress = max(job.progress or 0.0, progress)
    if first_start:
        add_event(session, job_id, EventKind.STATUS, "running", data={"status": "running"})
    add_event(
        session,
        job_id,
        EventKind.STAGE,
        started,
        stage=stage,
        progress=job.progress,
        data={"attempt": attempt, "redelivered": redelivered},
    )
    return job


def memory_advice(stage: str) -> str:
    """What a customer can do about a stage that needs more memory than its worker has."""
    hint = MEMORY_SETTINGS.get(stage)
    return (f"Lower {hint}, or run" if hint else "Run") + " it on a worker with more memory."


def _previous_delivery_lost(session: Session, job: AnyJob, stage: str, owner: str) -> bool:
    """Whether the last delivery of `stage` ended without a word: it still names a lease holder
    (or the sweep's "requeued" mark) that no live process renews. A stage that returned or
    raised released its lease; one whose worker shut down under it said so (INTERRUPTED)."""
    holder = job.lease_owner
    if job.status != JobStatus.RUNNING or job.stage != stage or not holder or holder == owner:
        return False
    _, event_model = job_tables(job.id)
    last = session.scalar(
        select(event_model.message)
        .where(
            event_model.job_id == job.id,
            event_model.stage == stage,
            event_model.message.in_([f"{stage} started", f"{stage} {INTERRUPTED}"]),
        )
        .order_by(event_model.id.desc())
        .limit(1)
    )
    return last == f"{stage} started"


def _lost_again(session: Session, job: AnyJob, stage: str, max_losses: int | None) -> bool:
    """Count one more loss of `stage`'s process; past `max_losses`, fail the job instead (a
    broker gives a lost task back with no count of its own, so a stage that is killed every
    time, out of memory, would otherwise be delivered for ever). False when it failed."""
    _, event_model = job_tables(job.id)
    losses = 1 + (
        session.scalar(
            select(func.count())
            .select_from(event_model)
            .where(
                event_model.job_id == job.id,
                event_model.stage == stage,
                event_model.message.startswith(f"{stage} {LOST}"),
            )
        )
        or 0
    )
    data = {"lease_owner": job.lease_owner, "losses": losses}
    if max_losses is not None and losses > max_losses:
        detail = (
            f"the {stage} stage's process was lost {losses} times before it finished (killed, "
            "most often for lack of memory); the job stopped instead of trying again. "
            + memory_advice(stage)
        )
        fail(session, job.id, stage, WORKER_LOST, detail, data)
        log.error("job %s: %s lost %d times; failed", job.id, stage, losses)
        return False
    allowed = "" if max_losses is None else f" ({losses} of the {max_losses} losses allowed)"
    add_event(
        session, job.id, EventKind.WARNING,
        f"{stage} {LOST} (its process was killed or its host lost); running it again{allowed}",
        stage=stage, progress=job.progress, data=data,
    )
    log.warning("job %s: %s was lost (%s); running it again", job.id, stage, job.lease_owner)
    return True


def interrupted(session: Session, job_id: str, stage: str) -> None:
    """The worker running `stage` is shutting down under it (not a cancel): say so, so the
    next delivery does not count it as a lost process."""
    job = locked_job(session, job_id)
    if job is not None and job.status == JobStatus.RUNNING and job.stage == stage:
        add_event(session, job_id, EventKind.WARNING, f"{stage} {INTERRUPTED}", stage=stage,
                  progress=job.progress)


def record_stage(
    session: Session, job_id: str, stage: str, outcome: StageOutcome, progress: float
) -> None:
    """A stage finished (or was found finished): its figures, progress and events."""
    job = locked_job(session, job_id)
    if job is None:
        raise JobCancelled(job_id)
    metrics = dict(job.metrics or {})
    stages = dict(metrics.get("stages", {}))
    stages[stage] = {
        "counts": outcome.counts,
        "metrics": outcome.metrics,
        "seconds": outcome.seconds,
    }
    metrics["stages"] = stages
    job.metrics = metrics  # a new dict: JSON columns do not track in-place changes
    job.progress = max(job.progress or 0.0, progress)
    verb = "skipped (already finished)" if outcome.skipped else "finished"
    add_event(
        session,
        job_id,
        EventKind.STAGE,
        f"{stage} {verb}",
        stage=stage,
        progress=job.progress,
        data={"skipped": outcome.skipped, "seconds": outcome.seconds, "counts": outcome.counts},
    )
    if outcome.metrics:
        add_event(
            session, job_id, EventKind.METRIC, f"{stage} metrics", stage=stage, data=outcome.metrics
        )
    if not outcome.skipped:  # a skipped stage was announced when it finished the first time
        webhooks.emit(session, job, webhooks.JOB_STAGE_COMPLETED, completed_stage=stage,
                      seconds=outcome.seconds, counts=outcome.counts)


def advance(session: Session, job_id: str, next_stage: str, task_id: str) -> None:
    """Point a running job at its next stage, whose task `task_id` has been sent."""
    model, _ = job_tables(job_id)
    session.execute(
        update(model)
        .where(model.id == job_id, model.status == JobStatus.RUNNING)
        .values(stage=next_stage, celery_task_id=task_id)
    )


def reserve_model_id(session: Session, job_id: str) -> str:
    """The job's model id, chosen once: a redelivered evaluate reuses it (no orphans)."""
    job = locked_job(session, job_id)
    if job is None:
        raise JobCancelled(job_id)
    if job.model_id is None:
        job.model_id = new_id("mdl")
    return job.model_id


def succeed(session: Session, job_id: str, model: TunedModel, report: Mapping[str, Any]) -> None:
    """running -> succeeded: record the tuned model (once) and the evaluate report's figures,
    warnings and recommendation. JobCancelled when the job is no longer running."""
    job = locked_job(session, job_id)
    if job is None or job.status != JobStatus.RUNNING:
        raise JobCancelled(job_id)
    if session.get(TunedModel, model.id) is None:
        session.add(model)
    recommended = report.get("recommended", "base")
    job.metrics = {**(job.metrics or {}), **{k: report[k] for k in REPORT_FIGURES if k in report}}
    job.recommended = Recommendation(recommended)
    job.status = JobStatus.SUCCEEDED
    job.progress = 1.0
    job.finished_at = utcnow()
    warnings = [str(w) for w in report.get("warnings", [])]
    if recommended != "tuned" and not any("base" in w for w in warnings):
        add_event(
            session,
            job_id,
            EventKind.WARNING,
            "the tuned model does not beat its base model on evaluation; "
            "the base model stays the recommendation",
            stage="evaluate",
            data={"gain": report.get("gain", {})},
        )
    for warning in warnings:
        add_event(session, job_id, EventKind.WARNING, warning, stage="evaluate")
    add_event(
        session,
        job_id,
        EventKind.STATUS,
        "succeeded",
        progress=1.0,
        data={"status": "succeeded", "model_id": model.id, "recommended": recommended},
    )
    webhooks.emit(session, job, webhooks.JOB_SUCCEEDED)


def complete(
    session: Session, job_id: str, stage: str, metrics: Mapping[str, Any], message: str
) -> None:
    """running -> succeeded for a job that publishes no model (a bulk embedding): its figures
    join the job's metrics. JobCancelled when the job is no longer running."""
    job = locked_job(session, job_id)
    if job is None or job.status != JobStatus.RUNNING:
        raise JobCancelled(job_id)
    job.metrics = {**(job.metrics or {}), **metrics}
    job.status = JobStatus.SUCCEEDED
    job.progress = 1.0
    job.finished_at = utcnow()
    add_event(session, job_id, EventKind.STATUS, message, stage=stage, progress=1.0,
              data={"status": "succeeded", **metrics})
    webhooks.emit(session, job, webhooks.JOB_SUCCEEDED)


def fail(
    session: Session, job_id: str, stage: str, code: str, detail: str, data: dict[str, Any]
) -> None:
    """-> failed with the error clients read ({"error", "detail", "stage"}); `data` goes to the
    event only (operators). A job that has already finished is left alone."""
    job = locked_job(session, job_id)
    if job is None or job.status in FINISHED_JOB_STATUSES:
        return
    _fail(job, stage, code, detail)
    add_event(
        session,
        job_id,
        EventKind.STATUS,
        f"{stage} failed: {detail}",
        stage=stage,
        data={"status": "failed", "error": code, **data},
    )
    webhooks.emit(session, job, webhooks.JOB_FAILED)


def cancel(
    session: Session, job_id: str, stage: str | None, message: str, *, requested_only: bool = False
) -> bool:
    """-> cancelled, once; True when this call made the change. `requested_only`: only a job
    whose cancel was requested (cancelling), for a stopped task that may be a shutdown instead."""
    job = locked_job(session, job_id)
    if job is None or job.status in FINISHED_JOB_STATUSES:
        return False
    if requested_only and job.status != JobStatus.CANCELLING:
        return False
    _cancel(session, job, stage, message)
    return True


def _cancel(session: Session, job: AnyJob, stage: str | None, message: str) -> None:
    job.status = JobStatus.CANCELLED
    job.finished_at = utcnow()
    add_event(session, job.id, EventKind.STATUS, message, stage=stage, data={"status": "cancelled"})
    webhooks.emit(session, job, webhooks.JOB_CANCELLED)


def _fail(job: AnyJob, stage: str, code: str, detail: str) -> None:
    job.status = JobStatus.FAILED
    job.error = {"error": code, "detail": detail, "stage": stage}
    job.finished_at = utcnow()
