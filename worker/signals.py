"""Celery signal hooks of a worker: structured logs, fresh database connections in each pool
process, cancels of revoked tasks, the lapsed-lease and retention sweepers, and the embedded
set-up's resume after a restart.

Loaded by the worker with the tasks (worker.celery_app's `include`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import signals
from sqlalchemy import select

from app.db.models import EmbeddingJob, Job, JobStatus
from app.db.session import get_engine, session_scope
from app.jobs import lifecycle, retention
from app.logs import configure_logging
from app.settings import get_settings
from worker.artifacts import store_for
from worker.celery_app import EMBED_STAGE
from worker.dispatch import resend
from worker.leases import lease_wait_s, sweep_forever

log = logging.getLogger(__name__)


@signals.setup_logging.connect
def _structured_logs(**_: Any) -> None:
    """The API's log format for every line of the worker (Celery's own included): JSON by
    default, each line of a task carrying its job, stage, tenant and request ids (worker.tasks).
    Connecting here also keeps Celery from installing its own handlers."""
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)


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


def _sweep_retention_forever(interval_s: float) -> None:
    settings = get_settings()
    store = store_for(settings)
    while True:
        time.sleep(interval_s)
        try:
            retention.sweep(settings, store)
        except Exception as error:  # the database or store is down: try again next time
            log.warning("retention sweep failed: %s", error)


@signals.worker_ready.connect
def _start_retention_sweeper(**_: Any) -> None:
    """In the worker's main process: remove stopped jobs' objects and work folders and deleted
    models' cached copies (app.jobs.retention) every retention_sweep_s."""
    threading.Thread(
        target=_sweep_retention_forever, args=(get_settings().retention_sweep_s,),
        name="retention-sweeper", daemon=True,
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
