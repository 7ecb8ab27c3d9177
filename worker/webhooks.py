"""Webhook delivery: one task sends one attempt of one delivery, signed per Standard Webhooks.

An attempt claims its delivery row (so a duplicate copy of the task, redelivered by the broker,
does not send it twice at once), sends the POST without holding any transaction, then records
what happened. A 2xx answer succeeds; anything else (another status, a timeout, a refused
connection) is retried with exponential backoff until the delivery's attempts are spent. A
target the SSRF guard refuses fails at once: retrying cannot make it allowed. The sweep in the
worker's main process re-sends attempts whose task was lost (a broker down when the event
committed, a filesystem-broker worker restarted with a countdown pending).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import or_, select
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from app.db.base import utcnow
from app.db.models import DeliveryStatus, WebhookDelivery
from app.db.session import session_scope
from app.settings import Settings, get_settings
from app.webhooks.events import send_after_commit
from app.webhooks.guard import TargetRefused, check_url
from worker.celery_app import TASK_DELIVER_WEBHOOK, celery_app

log = logging.getLogger(__name__)

USER_AGENT = "Tailor-Webhooks/1"
# Attempts kept in a delivery's log (the count keeps going).
KEPT_ATTEMPTS = 50
# A due attempt whose task has not run this long after it was due is sent again by the sweep.
SWEEP_GRACE_S = 120.0


def backoff_s(attempt: int, settings: Settings) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): doubling from the base, capped,
    with up to 10 % jitter so a receiver that comes back is not hit by every retry at once."""
    delay = min(settings.webhook_backoff_base_s * 2 ** (attempt - 1),
                settings.webhook_backoff_max_s)
    return delay * (1 + random.random() * 0.1)


def body_bytes(payload: dict[str, Any]) -> bytes:
    """The body as sent (and signed)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def signed_headers(secret: str, message_id: str, body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers for `body`, signed now."""
    now = utcnow()
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, now, body),
    }


@celery_app.task(name=TASK_DELIVER_WEBHOOK, bind=True, acks_late=True, ignore_result=True)
def deliver(self: Any, delivery_id: str, attempt: int) -> str:
    """Send attempt `attempt` of delivery `delivery_id`; returns what happened."""
    settings = get_settings()
    with session_scope() as session:
        claimed = _claim(session, delivery_id, attempt, settings)
    if isinstance(claimed, str):
        return claimed
    url, secret, message_id, payload = claimed
    outcome = _send(url, secret, message_id, payload, settings)
    with session_scope() as session:
        return _record(session, delivery_id, attempt, outcome, settings)


def _locked(session: Session, delivery_id: str) -> WebhookDelivery | None:
    return session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.id == delivery_id).with_for_update()
    ).one_or_none()


def _claim(
    session: Session, delivery_id: str, attempt: int, settings: Settings
) -> tuple[str, str, str, dict[str, Any]] | str:
    delivery = _locked(session, delivery_id)
    if delivery is None:
        return "gone"  # its endpoint was deleted
    if delivery.status != DeliveryStatus.PENDING or delivery.attempts != attempt - 1:
        return "stale"  # a duplicate of an attempt already made
    now = utcnow()
    if delivery.claimed_until is not None and delivery.claimed_until > now:
        return "busy"  # another copy is sending this attempt right now
    endpoint = delivery.endpoint
    if not endpoint.enabled:
        _finish(delivery, attempt, None, 0.0, "the endpoint is disabled", retry_in=None)
        return "disabled"
    delivery.claimed_until = now + timedelta(seconds=settings.webhook_timeout_s + 30)
    return endpoint.url, endpoint.secret, delivery.message_id, delivery.payload


class _Outcome:
    def __init__(self, status_code: int | None, latency_ms: float, error: str | None,
                 permanent: bool = False) -> None:
        self.status_code, self.latency_ms, self.error = status_code, latency_ms, error
        self.permanent = permanent

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _send(url: str, secret: str, message_id: str, payload: dict[str, Any],
          settings: Settings) -> _Outcome:
    try:
        check_url(url, settings)
    except TargetRefused as refused:
        return _Outcome(None, 0.0, f"target refused: {refused}", permanent=True)
    body = body_bytes(payload)
    headers = {"content-type": "application/json", "user-agent": USER_AGENT,
               **signed_headers(secret, message_id, body)}
    started = time.perf_counter()
    try:
        # No redirects: a 3xx to an internal address would walk around the guard.
        with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False) as client:
            response = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as error:
        latency = (time.perf_counter() - started) * 1000
        return _Outcome(None, latency, f"{type(error).__name__}: {error}"[:500])
    latency = (time.perf_counter() - started) * 1000
    error = None
    if not 200 <= response.status_code < 300:
        error = f"HTTP {response.status_code}: {response.text[:200]}"
    return _Outcome(response.status_code, latency, error)


def _record(session: Session, delivery_id: str, attempt: int, outcome: _Outcome,
            settings: Settings) -> str:
    delivery = _locked(session, delivery_id)
    if delivery is None:
        return "gone"
    if outcome.ok or outcome.permanent or attempt >= delivery.max_attempts:
        retry_in = None
    else:
        retry_in = backoff_s(attempt, settings)
    _finish(delivery, attempt, outcome.status_code, outcome.latency_ms, outcome.error,
            retry_in=retry_in, ok=outcome.ok)
    if retry_in is not None:
        send_after_commit(session, delivery.id, attempt + 1, retry_in)
        log.info("webhook %s attempt %d failed (%s); retrying in %.0fs",
                 delivery_id, attempt, outcome.error, retry_in)
        return "retrying"
    return "succeeded" if outcome.ok else "failed"


def _finish(delivery: WebhookDelivery, attempt: int, status_code: int | None, latency_ms: float,
            error: str | None, *, retry_in: float | None, ok: bool = False) -> None:
    now = utcnow()
    entry = {"attempt": attempt, "at": now.isoformat(), "status_code": status_code,
             "latency_ms": round(latency_ms, 1), "error": error}
    delivery.attempt_log = [*(delivery.attempt_log or []), entry][-KEPT_ATTEMPTS:]
    delivery.attempts = attempt
    delivery.claimed_until = None
    if ok:
        delivery.status, delivery.next_attempt_at = DeliveryStatus.SUCCEEDED, None
    elif retry_in is None:
        delivery.status, delivery.next_attempt_at = DeliveryStatus.FAILED, None
    else:
        delivery.next_attempt_at = now + timedelta(seconds=retry_in)


def sweep_once(grace_s: float = SWEEP_GRACE_S) -> int:
    """Send again the attempts that are overdue by `grace_s` (their task was lost); returns how
    many. A duplicate of a task that was only late is dropped by the claim."""
    cutoff = utcnow() - timedelta(seconds=grace_s)
    with session_scope() as session:
        rows = session.scalars(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.status == DeliveryStatus.PENDING,
                WebhookDelivery.next_attempt_at < cutoff,
                or_(WebhookDelivery.claimed_until.is_(None),
                    WebhookDelivery.claimed_until < utcnow()),
            )
            .limit(500)
        ).all()
        for delivery in rows:
            # Due again now; the next sweep leaves it alone for another grace period.
            delivery.next_attempt_at = utcnow()
            send_after_commit(session, delivery.id, delivery.attempts + 1)
        return len(rows)


def sweep_forever(interval_s: float) -> None:
    """The sweep, every `interval_s` seconds, in a daemon thread of the worker's main process."""
    while True:
        time.sleep(interval_s)
        try:
            found = sweep_once()
            if found:
                log.warning("re-sent %d overdue webhook deliveries", found)
        except Exception:
            log.exception("webhook sweep failed")


def start_sweeper(interval_s: float = 60.0) -> threading.Thread:
    """Start the sweep thread."""
    thread = threading.Thread(target=sweep_forever, args=(interval_s,),
                              name="webhook-sweeper", daemon=True)
    thread.start()
    return thread
