"""Webhook endpoints (`/v1/webhooks`): register, update, delete them, read their deliveries and
send one again; and `verify`, for a receiver to check that a request came from Tailor.

Tailor signs each delivery the Standard Webhooks way (standardwebhooks.com): the headers
`webhook-id`, `webhook-timestamp` and `webhook-signature` ("v1,<base64 HMAC-SHA256>" of
"<id>.<timestamp>.<body>", keyed by the endpoint's `whsec_` secret). `verify` needs only the
standard library, so a receiver can use this package without adding another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tailor_client.errors import TailorError
from tailor_client.resources import MAX_PAGE, Collection
from tailor_client.transport import Retry
from tailor_client.types import (
    DeliveryStatus,
    Page,
    Webhook,
    WebhookCreated,
    WebhookDelivery,
)

DEFAULT_TOLERANCE_S = 300  # Standard Webhooks' default: older (or future) requests are refused


class WebhookVerificationError(TailorError):
    """A webhook request whose signature, timestamp or headers do not check out."""


class Webhooks(Collection[Webhook]):
    """The tenant's webhook endpoints and their deliveries."""

    path = "/v1/webhooks"

    def create(
        self,
        url: str,
        *,
        events: Sequence[str] | None = None,
        description: str = "",
        enabled: bool = True,
    ) -> WebhookCreated:
        """Register an endpoint (every event type unless `events` names some). The answer
        holds its signing secret (`secret`, `whsec_...`), which is not shown again; so the
        request is not sent again after an error the server may have acted on."""
        body: dict[str, Any] = {"url": url, "description": description, "enabled": enabled}
        if events is not None:
            body["events"] = list(events)
        return self._transport.json("POST", self.path, json=body, retry=Retry.UNSAFE)

    def update(
        self,
        id: str,
        *,
        url: str | None = None,
        events: Sequence[str] | None = None,
        description: str | None = None,
        enabled: bool | None = None,
    ) -> Webhook:
        """Change the fields given; the others stay as they are."""
        body = {"url": url, "events": list(events) if events is not None else None,
                "description": description, "enabled": enabled}
        return self._transport.json("PATCH", f"{self.path}/{id}",
                                    json={k: v for k, v in body.items() if v is not None})

    def delete(self, id: str) -> None:
        """Delete an endpoint and its delivery log; nothing more is sent to it."""
        self._delete(id)

    def deliveries(
        self, id: str, *, status: DeliveryStatus | None = None, offset: int = 0,
        limit: int = 20,
    ) -> Page[WebhookDelivery]:
        """One page of the endpoint's deliveries, newest first (`status`: pending, succeeded
        or failed), each with its attempts."""
        return self._transport.json(
            "GET", f"{self.path}/{id}/deliveries",
            params={"status": status, "offset": offset, "limit": limit},
        )

    def iter_deliveries(
        self, id: str, *, status: DeliveryStatus | None = None, page_size: int = MAX_PAGE
    ) -> Iterator[WebhookDelivery]:
        """Every delivery of the endpoint, page by page (each once)."""
        return self._paged(lambda offset, limit: self.deliveries(
            id, status=status, offset=offset, limit=limit), page_size)

    def redeliver(self, id: str, delivery_id: str) -> WebhookDelivery:
        """Send a delivery again (the same `webhook-id`, a fresh signature and round of
        attempts); 409 `invalid_state` while it is still pending or the endpoint disabled."""
        return self._transport.json(
            "POST", f"{self.path}/{id}/deliveries/{delivery_id}/redeliver", retry=Retry.UNSAFE
        )


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for a body (what Tailor sends; also for tests)."""
    content = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    secret: str,
    body: bytes | str,
    headers: Mapping[str, str],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a delivery's signature and age; returns its payload (`{"type", "timestamp",
    "data"}`). Pass the raw body exactly as received (not re-encoded JSON). Raises
    WebhookVerificationError naming what is wrong. Deduplicate on `webhook-id`: a retry or
    a redelivery carries the same one."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        message_id = lower["webhook-id"]
        stamp = lower["webhook-timestamp"]
        signatures = lower["webhook-signature"]
    except KeyError as missing:
        raise WebhookVerificationError(f"missing header {missing.args[0]}") from None
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {stamp!r} is not a number") from None
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp is {age:.0f} s from now (tolerance {tolerance_s:.0f} s): "
            "too old, or the clocks disagree")
    raw = body.encode() if isinstance(body, str) else body
    expected = sign(secret, message_id, timestamp, raw).split(",", 1)[1]
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            break
    else:
        raise WebhookVerificationError("no webhook-signature matches the body and the secret")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise WebhookVerificationError(f"the body is not JSON: {exc}") from exc


def _key(secret: str) -> bytes:
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WebhookVerificationError("the secret is not a whsec_ signing secret") from exc
