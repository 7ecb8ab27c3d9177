"""Webhook request and response schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.db.models import DeliveryStatus
from app.schemas import ReadSchema

EventType = Literal["job.succeeded", "job.failed", "job.cancelled", "job.stage_completed"]
ALL_EVENTS: list[EventType] = ["job.succeeded", "job.failed", "job.cancelled",
                               "job.stage_completed"]

URL_FIELD = Field(
    max_length=2048,
    description="Where events are POSTed: an http(s) URL whose host resolves to public "
    "addresses (private and loopback targets are refused unless the deployment allows them).",
    examples=["https://hooks.example.com/tailor"],
)
EVENTS_DESCRIPTION = (
    "The event types sent to this endpoint: `job.succeeded`, `job.failed`, `job.cancelled`, "
    "`job.stage_completed` (training and bulk embedding jobs; `data.object` tells which)."
)


class WebhookCreate(BaseModel):
    """A new endpoint."""

    model_config = ConfigDict(extra="forbid")

    url: str = URL_FIELD
    events: list[EventType] = Field(default_factory=lambda: list(ALL_EVENTS), min_length=1,
                                    description=EVENTS_DESCRIPTION + " Default: all of them.")
    description: str = Field(default="", max_length=200)
    enabled: bool = Field(default=True, strict=True)


class WebhookUpdate(BaseModel):
    """Fields to change; the ones left out stay as they are."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, max_length=2048)
    events: list[EventType] | None = Field(default=None, min_length=1,
                                           description=EVENTS_DESCRIPTION)
    description: str | None = Field(default=None, max_length=200)
    enabled: bool | None = Field(default=None, strict=True,
                                 description="A disabled endpoint is sent nothing.")


class WebhookRead(ReadSchema):
    """An endpoint, without its secret."""

    id: str = Field(examples=["whk_5d1c0e9a2b7f4c6d8e0a1b2c"])
    url: str
    events: list[str]
    description: str
    enabled: bool
    created_at: datetime
    updated_at: datetime


class WebhookCreated(WebhookRead):
    """A new endpoint with its signing secret: the only response that shows it."""

    secret: str = Field(
        description="`whsec_...`: verify each request's `webhook-signature` with it (Standard "
        "Webhooks). Shown only once."
    )


class WebhookList(BaseModel):
    """A page of the tenant's endpoints, newest first."""

    data: list[WebhookRead]
    count: int


class DeliveryAttempt(BaseModel):
    """One attempt to deliver an event."""

    attempt: int
    at: datetime
    status_code: int | None = Field(description="The receiver's answer; none when it gave "
                                    "none (timeout, refused connection, refused target).")
    latency_ms: float
    error: str | None


class WebhookDeliveryRead(ReadSchema):
    """One event sent to one endpoint, and every attempt so far."""

    id: str = Field(examples=["whd_5d1c0e9a2b7f4c6d8e0a1b2c"])
    endpoint_id: str
    message_id: str = Field(description="The `webhook-id` header: the same on every attempt "
                            "and redelivery, so a receiver can drop duplicates.")
    event_type: str
    payload: dict[str, Any] = Field(description="The body as sent: {type, timestamp, data}.")
    status: DeliveryStatus = Field(description="`pending` (an attempt is queued or due), "
                                   "`succeeded` (a 2xx answer), `failed` (attempts spent).")
    attempts: int
    max_attempts: int
    next_attempt_at: datetime | None = Field(description="When the next retry is due.")
    attempt_log: list[DeliveryAttempt] = Field(description="The latest attempts, oldest first.")
    created_at: datetime
    updated_at: datetime


class WebhookDeliveryList(BaseModel):
    """A page of an endpoint's deliveries, newest first."""

    data: list[WebhookDeliveryRead]
    count: int
