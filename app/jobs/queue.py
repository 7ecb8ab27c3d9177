"""The API's side of the task queue (worker.dispatch), imported lazily so the app starts, and
serves reads, even where Celery's broker libraries are slow to import or misconfigured."""

from __future__ import annotations


def enqueue_first_stage(job_id: str) -> str:
    """Send the job's first stage task; returns the Celery task id (recorded on the job)."""
    from worker.dispatch import enqueue_stage

    return enqueue_stage(job_id, "prepare")


def enqueue_embedding(job_id: str) -> str:
    """Send a bulk embedding job's task; returns the Celery task id (recorded on the job)."""
    from worker.dispatch import enqueue_embedding as send

    return send(job_id)


def revoke_task(task_id: str) -> bool:
    """Ask workers to drop a task that has not started; False if the broadcast failed."""
    from worker.dispatch import revoke

    return revoke(task_id, terminate=False)


def broker_ok() -> bool:
    """Whether the broker accepts connections."""
    from worker.dispatch import broker_ok as check

    return check()
