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

from app.db.models import EMBEDDING_JOB_PREFIX, job_tables
from app.db.session import session_scope
from app.settings import get_settings
from worker.celery_app import (
    EMBED_QUEUE,
    FIRST_STAGE,
    TASK_DELIVER_WEBHOOK,
    TASK_EMBED_CORPUS,
    TASK_RUN_STAGE,
    WEBHOOK_QUEUE,
    celery_app,
    create_app,
    queue_for,
)

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


def _send(name: str, args: tuple[str | int, ...], queue: str, task_id: str | None,
          countdown: float | None = None) -> str:
    task_id = task_id or str(uuid4())
    _sender().send_task(
        name,
        args=args,
        countdown=countdown or None,
        queue=queue,
        routing_key=queue,
        task_id=task_id,
        # Retry the publish itself a few times if the broker connection blips.
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
    )
    return task_id


def send_stage(job_id: str, stage: str, task_id: str | None = None) -> str:
    """Publish run_stage(job_id, stage) on the stage's queue; returns the task id."""
    return _send(TASK_RUN_STAGE, (job_id, stage), queue_for(stage), task_id)


def send_embedding(job_id: str, task_id: str | None = None) -> str:
    """Publish embed_corpus(job_id) on the GPU queue; returns the task id."""
    return _send(TASK_EMBED_CORPUS, (job_id,), EMBED_QUEUE, task_id)


def send_webhook(delivery_id: str, attempt: int, countdown: float = 0.0) -> str:
    """Publish attempt `attempt` of a webhook delivery on the webhooks queue, due in
    `countdown` seconds; returns the task id."""
    return _send(TASK_DELIVER_WEBHOOK, (delivery_id, attempt), WEBHOOK_QUEUE, None, countdown)


def resend(job_id: str, stage: str | None) -> str:
    """Send again the task that runs a job's current `stage`, whichever kind of job it is (the
    lease sweep, the embedded set-up's restart); returns the task id."""
    if job_id.startswith(EMBEDDING_JOB_PREFIX):
        return send_embedding(job_id)
    return send_stage(job_id, stage or FIRST_STAGE)


def _record_task(job_id: str, task_id: str) -> None:
    model, _ = job_tables(job_id)
    with session_scope() as session:
        session.execute(update(model).where(model.id == job_id).values(celery_task_id=task_id))


def enqueue_stage(job_id: str, stage: str) -> str:
    """Send a job's stage task and record its task id on the job row; returns the task id.

    Call it after the transaction that created or advanced the job has committed: the worker
    may pick the task up at once and must find the row.
    """
    task_id = send_stage(job_id, stage)
    _record_task(job_id, task_id)
    return task_id


def enqueue_embedding(job_id: str) -> str:
    """Send a bulk embedding job's task and record its id on the row (after the commit that
    created the job, like enqueue_stage); returns the task id."""
    task_id = send_embedding(job_id)
    _record_task(job_id, task_id)
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
