"""What the API needs from the queue: send a stage task, check the broker, revoke a task.

Imports only Celery and the database models: never torch or ml_core stages, so the API process
stays light. Tasks are sent by name, so the API never imports worker.tasks.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from uuid import uuid4

from celery import Celery
from sqlalchemy import update

from app.db.models import Job
from app.db.session import session_scope
from app.settings import get_settings
from worker.celery_app import TASK_RUN_STAGE, celery_app, create_app, queue_for

log = logging.getLogger(__name__)
_IMPORTED_APP = celery_app


@lru_cache(maxsize=8)
def _app_for(settings_json: str) -> Celery:
    # Keyed by all the settings, not a hand-picked few: a broker setting added later (as the
    # key prefix was) cannot be missed. Settings change only in tests, so few apps are built.
    return create_app(get_settings())


def _sender() -> Celery:
    """The Celery app for the settings in force now (one cached app per broker configuration).

    The module-level app is configured when worker.celery_app is first imported; a process that
    changes its settings afterwards (the test suite does, per fixture) must still publish to the
    broker its settings name. An app assigned to `celery_app` explicitly is used as it is.
    """
    if celery_app is not _IMPORTED_APP:
        return celery_app
    return _app_for(get_settings().model_dump_json())


def send_stage(job_id: str, stage: str, task_id: str | None = None) -> str:
    """Publish run_stage(job_id, stage) on the stage's queue; returns the task id."""
    task_id = task_id or str(uuid4())
    _sender().send_task(
        TASK_RUN_STAGE,
        args=(job_id, stage),
        queue=queue_for(stage),
        routing_key=queue_for(stage),
        task_id=task_id,
        # Retry the publish itself a few times if the broker connection blips.
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
    )
    return task_id


def enqueue_stage(job_id: str, stage: str) -> str:
    """Send a job's stage task and record its task id on the job row; returns the task id.

    Call it after the transaction that created or advanced the job has committed: the worker
    may pick the task up at once and must find the row.
    """
    task_id = send_stage(job_id, stage)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(celery_task_id=task_id))
    return task_id


def broker_ok(timeout: float = 2.0) -> bool:
    """Whether the broker accepts connections right now (readiness probe)."""
    try:
        with _sender().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
            # For Redis, opening a channel pings the server; for the filesystem transport it
            # checks the folders.
            connection.default_channel  # noqa: B018
        return True
    except Exception as error:  # any failure means "not ready"; the probe must not raise
        log.warning("broker not reachable: %s", error)
        return False


def revoke(task_id: str, terminate: bool = False) -> bool:
    """Revoke a task: a worker drops it if not started; with terminate, stops it if running.

    Terminating sends SIGTERM to the pool process running the task; the stage task turns that
    into a `cancelled` job. Returns False when the broadcast could not be sent (the worker's
    own cancellation check still stops the job at its next progress report).
    """
    app = _sender()
    try:
        with app.connection_for_write() as connection:
            # Fail fast when the broker is down: the cancel request must not hang on it.
            connection.ensure_connection(max_retries=1, timeout=2)
            app.control.revoke(
                task_id, terminate=terminate, signal="SIGTERM", connection=connection
            )
        return True
    except Exception as error:
        log.warning("could not broadcast revoke of %s: %s", task_id, error)
        return False
