"""Webhook routes: endpoints (create, list, read, update, delete), their deliveries, and
redelivery. Events are queued by app.webhooks.events and sent by the workers."""

from __future__ import annotations

import base64
import secrets
from typing import Annotated

from fastapi import APIRouter, Query, status
from sqlalchemy import delete

from app.db.base import utcnow
from app.db.models import DeliveryStatus, WebhookDelivery, WebhookEndpoint
from app.db.tenant_rows import newest_first, owned
from app.deps import CurrentTenant, PageDep, SessionDep, SettingsDep
from app.errors import (
    InsufficientScope,
    InvalidRequest,
    InvalidState,
    NotFound,
    Unauthorized,
    responses,
)
from app.ids import new_id
from app.settings import Settings
from app.webhooks.events import send_after_commit
from app.webhooks.guard import TargetRefused, check_url
from app.webhooks.schemas import (
    WebhookCreate,
    WebhookCreated,
    WebhookDeliveryList,
    WebhookDeliveryRead,
    WebhookList,
    WebhookRead,
    WebhookUpdate,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

ERRORS = (Unauthorized, InsufficientScope, InvalidRequest)


def new_secret() -> str:
    """A signing secret as Standard Webhooks writes one: `whsec_` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _checked_url(url: str, settings: Settings) -> str:
    try:
        check_url(url, settings)
    except TargetRefused as refused:
        raise InvalidRequest(f"url: {refused}", field="url") from refused
    return url


def _unique(events: list[str]) -> list[str]:
    return list(dict.fromkeys(events))


@router.post(
    "", response_model=WebhookCreated, status_code=status.HTTP_201_CREATED,
    responses=responses(*ERRORS),
)
def create_webhook(body: WebhookCreate, session: SessionDep, tenant: CurrentTenant,
                   settings: SettingsDep) -> WebhookCreated:
    """Register an endpoint. The response holds its signing secret (`whsec_...`), which is not
    shown again. Each event is a POST of `{"type", "timestamp", "data"}` with the Standard
    Webhooks headers `webhook-id`, `webhook-timestamp` and `webhook-signature`."""
    endpoint = WebhookEndpoint(
        id=new_id("whk"), tenant_id=tenant.id, url=_checked_url(body.url, settings),
        events=_unique(list(body.events)), description=body.description, enabled=body.enabled,
        secret=new_secret(),
    )
    session.add(endpoint)
    session.flush()
    return WebhookCreated.model_validate(
        {**WebhookRead.model_validate(endpoint).model_dump(), "secret": endpoint.secret}
    )


@router.get("", response_model=WebhookList, responses=responses(*ERRORS))
def list_webhooks(session: SessionDep, tenant: CurrentTenant, page: PageDep) -> WebhookList:
    """List this tenant's endpoints, newest first (no secrets)."""
    rows, count = newest_first(session, WebhookEndpoint, page,
                               WebhookEndpoint.tenant_id == tenant.id)
    return WebhookList(data=[WebhookRead.model_validate(row) for row in rows], count=count)


@router.get("/{webhook_id}", response_model=WebhookRead, responses=responses(*ERRORS, NotFound))
def get_webhook(webhook_id: str, session: SessionDep, tenant: CurrentTenant) -> WebhookEndpoint:
    """Read one endpoint (no secret)."""
    return owned(session, WebhookEndpoint, tenant.id, webhook_id, "webhook")


@router.patch("/{webhook_id}", response_model=WebhookRead,
              responses=responses(*ERRORS, NotFound))
def update_webhook(webhook_id: str, body: WebhookUpdate, session: SessionDep,
                   tenant: CurrentTenant, settings: SettingsDep) -> WebhookEndpoint:
    """Change an endpoint's URL, events, description or whether it is enabled. Deliveries
    already pending go to the new URL; a disabled endpoint's pending deliveries fail."""
    endpoint = owned(session, WebhookEndpoint, tenant.id, webhook_id, "webhook")
    if body.url is not None:
        endpoint.url = _checked_url(body.url, settings)
    if body.events is not None:
        endpoint.events = _unique(list(body.events))
    if body.description is not None:
        endpoint.description = body.description
    if body.enabled is not None:
        endpoint.enabled = body.enabled
    endpoint.updated_at = utcnow()
    session.flush()
    return endpoint


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses=responses(*ERRORS, NotFound))
def delete_webhook(webhook_id: str, session: SessionDep, tenant: CurrentTenant) -> None:
    """Delete an endpoint and its delivery log; nothing more is sent to it."""
    endpoint = owned(session, WebhookEndpoint, tenant.id, webhook_id, "webhook")
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id))
    session.delete(endpoint)


@router.get("/{webhook_id}/deliveries", response_model=WebhookDeliveryList,
            responses=responses(*ERRORS, NotFound))
def list_webhook_deliveries(
    webhook_id: str, session: SessionDep, tenant: CurrentTenant, page: PageDep,
    delivery_status: Annotated[DeliveryStatus | None, Query(
        alias="status", description="Only deliveries in this state.")] = None,
) -> WebhookDeliveryList:
    """The endpoint's deliveries, newest first: each event's attempts (time, status code,
    latency, error) and when the next retry is due."""
    owned(session, WebhookEndpoint, tenant.id, webhook_id, "webhook")
    where = [WebhookDelivery.endpoint_id == webhook_id, WebhookDelivery.tenant_id == tenant.id]
    if delivery_status is not None:
        where.append(WebhookDelivery.status == delivery_status)
    rows, count = newest_first(session, WebhookDelivery, page, *where)
    return WebhookDeliveryList(data=[WebhookDeliveryRead.model_validate(r) for r in rows],
                               count=count)


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/redeliver", response_model=WebhookDeliveryRead,
    status_code=status.HTTP_202_ACCEPTED, responses=responses(*ERRORS, NotFound, InvalidState),
)
def redeliver_webhook(webhook_id: str, delivery_id: str, session: SessionDep,
                      tenant: CurrentTenant, settings: SettingsDep) -> WebhookDelivery:
    """Send a delivery again (same `webhook-id`, a fresh signature), with a fresh round of
    attempts. 409 while it is still pending; 409 when the endpoint is disabled."""
    endpoint = owned(session, WebhookEndpoint, tenant.id, webhook_id, "webhook")
    delivery = owned(session, WebhookDelivery, tenant.id, delivery_id, "webhook_delivery",
                     WebhookDelivery.endpoint_id == webhook_id)
    if delivery.status == DeliveryStatus.PENDING:
        raise InvalidState(f"delivery {delivery_id} is still pending (next attempt at "
                           f"{delivery.next_attempt_at}); redeliver it once it has finished",
                           status=delivery.status.value)
    if not endpoint.enabled:
        raise InvalidState(f"webhook {webhook_id} is disabled; enable it first")
    delivery.status = DeliveryStatus.PENDING
    delivery.max_attempts = delivery.attempts + settings.webhook_max_attempts
    delivery.next_attempt_at = utcnow()
    delivery.claimed_until = None
    session.flush()
    send_after_commit(session, delivery.id, delivery.attempts + 1)
    return delivery
