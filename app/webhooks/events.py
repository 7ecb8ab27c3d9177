"""Job events become webhook deliveries in the transaction that changes the job.

app.jobs.lifecycle calls `emit` at each transition (API-side cancels and worker-side finishes
alike). `emit` adds one delivery row per enabled endpoint of the job's tenant that wants the
event, in the caller's session: the event is delivered if and only if the transition commits
(an outbox). The delivery tasks are sent once the session commits (never before: a worker
could otherwise read the row before it exists), by a session hook; sending is a publish to the
broker, so the API never waits on a receiver. A send that fails is picked up by the workers'
sweep (worker.webhooks). Imports only the database layer, like the lifecycle.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import (
    EMBEDDING_JOB_PREFIX,
    AnyJob,
    DeliveryStatus,
    WebhookDelivery,
    WebhookEndpoint,
)
from app.ids import new_id
from app.settings import get_settings

log = logging.getLogger(__name__)

JOB_SUCCEEDED = "job.succeeded"
JOB_FAILED = "job.failed"
JOB_CANCELLED = "job.cancelled"
JOB_STAGE_COMPLETED = "job.stage_completed"
EVENT_TYPES = (JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED, JOB_STAGE_COMPLETED)

# session.info key: (delivery id, attempt, countdown seconds) to send after the commit.
_TO_SEND = "tailor.webhooks.to_send"


def job_data(job: AnyJob) -> dict[str, Any]:
    """What an event says about its job (either kind; `object` tells which)."""
    data: dict[str, Any] = {
        "id": job.id,
        "object": "embedding_job" if job.id.startswith(EMBEDDING_JOB_PREFIX) else "job",
        "status": job.status.value,
        "stage": job.stage,
        "progress": job.progress,
        "error": job.error,
        "created_at": _iso(job.created_at),
        "finished_at": _iso(job.finished_at),
    }
    for name in ("model_id", "recommended", "corpus_id", "model"):
        value = getattr(job, name, None)
        if value is not None:
            data[name] = getattr(value, "value", value)
    return data


def emit(session: Session, job: AnyJob, event_type: str, **extra: Any) -> int:
    """Queue `event_type` about `job` for each of its tenant's endpoints that want it; returns
    how many deliveries were made."""
    endpoints = session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id == job.tenant_id, WebhookEndpoint.enabled.is_(True)
        )
    ).all()
    targets = [endpoint for endpoint in endpoints if event_type in (endpoint.events or ())]
    if not targets:
        return 0
    now = utcnow()
    payload = {"type": event_type, "timestamp": _iso(now), "data": {**job_data(job), **extra}}
    attempts = get_settings().webhook_max_attempts
    for endpoint in targets:
        delivery = WebhookDelivery(
            id=new_id("whd"), tenant_id=job.tenant_id, endpoint_id=endpoint.id,
            message_id=new_id("msg"), event_type=event_type, payload=payload,
            status=DeliveryStatus.PENDING, attempts=0, attempt_log=[], max_attempts=attempts,
            next_attempt_at=now,
        )
        session.add(delivery)
        send_after_commit(session, delivery.id, 1)
    return len(targets)


def send_after_commit(session: Session, delivery_id: str, attempt: int,
                      countdown: float = 0.0) -> None:
    """Send the task for `attempt` of a delivery once `session` commits (dropped on rollback)."""
    session.info.setdefault(_TO_SEND, []).append((delivery_id, attempt, countdown))


@event.listens_for(Session, "after_commit")
def _send_committed(session: Session) -> None:
    pending = session.info.pop(_TO_SEND, None)
    if not pending:
        return
    from worker.dispatch import send_webhook

    for delivery_id, attempt, countdown in pending:
        try:
            send_webhook(delivery_id, attempt, countdown)
        except Exception:
            # The row is committed and pending: the workers' sweep sends it later.
            log.warning("could not queue webhook delivery %s; the sweep will retry it",
                        delivery_id, exc_info=True)


@event.listens_for(Session, "after_rollback")
def _drop_rolled_back(session: Session) -> None:
    session.info.pop(_TO_SEND, None)


def _iso(moment: Any) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None
