"""Celery signal hooks of a worker: fresh database connections in each pool process, cancels of
revoked tasks, the lapsed-lease sweeper, and the embedded set-up's resume after a restart.

Loaded by the worker with the tasks (worker.celery_app's `include`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import signals
from sqlalchemy import select

from app.db.models import EmbeddingJob, Job, JobStatus
from app.db.session import get_engine, session_scope
from app.jobs import lifecycle
from app.settings import get_settings
from worker.celery_app import EMBED_STAGE
from worker.dispatch import resend
from worker.leases import lease_wait_s, sweep_forever

log = logging.getLogger(__name__)


@signals.worker_process_init.connect
def _fresh_connections_after_fork(**_: Any) -> None:
    """A forked pool process must not reuse the parent's database connections."""
    get_engine().dispose(close=False)


@signals.task_revoked.connect
def _cancel_revoked_job(request: Any = None, terminated: bool = False, **_: Any) -> None:
    """In the worker's main process: a revoked task (a stage, or a bulk embedding) of a
    cancelling job cancels it.

    Covers the task revoked before it started (the worker drops it without running any of our
    code) and a pool process killed before it could record the cancel itself.
    """
    args = getattr(request, "args", None) or ()
    kwargs = getattr(request, "kwargs", None) or {}
    job_id = kwargs.get("job_id") or (args[0] if args else None)
    stage = kwargs.get("stage") or (args[1] if len(args) > 1 else EMBED_STAGE)
    if not job_id:
        return
    how = "terminated" if terminated else "revoked"
    try:
        with session_scope() as session:
            message = f"cancelled ({stage} task {how})"
            lifecycle.cancel(session, job_id, stage, message, requested_only=True)
    except Exception:
        log.exception("could not record the revoke of job %s", job_id)


@signals.worker_ready.connect
def _start_lease_sweeper(**_: Any) -> None:
    """In the worker's main process: sweep for lapsed leases every lease_ttl_s / 2 (at most a
    minute), so a job whose worker host died resumes without waiting for the broker."""
    interval = lease_wait_s(get_settings())
    threading.Thread(
        target=sweep_forever, args=(interval,), name="lease-sweeper", daemon=True
    ).start()


@signals.worker_ready.connect
def _recover_embedded_jobs(**_: Any) -> None:
    """Embedded default only: re-send the current stage of jobs a dead worker left running.

    kombu's filesystem transport removes a message's file when a worker takes it and has no
    visibility timeout, so a worker killed mid-stage loses its task for good. The embedded
    set-up runs one worker, so when it starts, any job still `running` (or `cancelling`) has no
    live task: sending its stage again resumes it (finished stages are skipped by manifest; a
    duplicate, if the old task had already sent one, is dropped as stale by the claim).
    Redis redelivers by itself (visibility timeout), so production never does this.
    """
    settings = get_settings()
    if not settings.broker_url.startswith("filesystem:"):
        return
    try:
        rows = []
        with session_scope() as session:
            for model in (Job, EmbeddingJob):
                rows += session.execute(
                    select(model.id, model.stage).where(
                        model.status.in_([JobStatus.RUNNING, JobStatus.CANCELLING])
                    )
                ).all()
        for job_id, stage in rows:
            log.warning("resuming job %s at %s (left running by a stopped worker)", job_id, stage)
            resend(job_id, stage)
    except Exception:
        log.exception("could not resume interrupted jobs")


@signals.worker_ready.connect
def _start_webhook_sweeper(**_: Any) -> None:
    """In the worker's main process: re-send webhook attempts whose task was lost."""
    from worker.webhooks import start_sweeper

    start_sweeper()
