"""Webhook endpoints through the API: create (secret once), list, read, update, delete; the URLs
refused (scheme, SSRF guard); tenant isolation and scope; deliveries queued by the job
lifecycle in the API's own transaction; redelivery rules. Sending them is the workers' part
(tests/test_e2e_webhooks.py)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.db.models import DeliveryStatus, WebhookDelivery
from app.settings import Settings
from app.webhooks.guard import TargetRefused, check_url
from tests.api_support import Api, Caller, start_api

pytest_plugins = ["tests.api_fixtures"]

RECEIVER = "http://127.0.0.1:9/hook"  # loopback: allowed by the fixture's setting


@pytest.fixture(params=["sqlite", "postgresql"])
def hooks_api(request: pytest.FixtureRequest, tmp_path: Path, model_store: Path,
              broker_dir: Path) -> Iterator[Api]:
    url = request.getfixturevalue(f"{request.param}_url")
    yield from start_api(tmp_path, url, model_store, webhook_allow_loopback=True)


def _create(caller: Caller, **body: Any) -> dict[str, Any]:
    response = caller.post("/v1/webhooks", json={"url": RECEIVER, **body})
    assert response.status_code == 201, response.text
    return response.json()


def _patch(caller: Caller, url: str, body: dict[str, Any]) -> Any:
    return caller.api.client.patch(url, json=body, headers=caller.headers)


def test_a_tenant_manages_its_endpoints(hooks_api: Api) -> None:
    caller = hooks_api.tenant()
    created = _create(caller, events=["job.failed", "job.failed", "job.succeeded"],
                      description="ci")
    secret = created.pop("secret")
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    assert created["events"] == ["job.failed", "job.succeeded"]  # duplicates dropped
    assert created["enabled"] is True and created["id"].startswith("whk_")
    everything = _create(caller)
    assert set(everything["events"]) == {"job.succeeded", "job.failed", "job.cancelled",
                                         "job.stage_completed"}

    listing = caller.get("/v1/webhooks").json()
    assert listing["count"] == 2 and secret not in str(listing)
    assert caller.get(f"/v1/webhooks/{created['id']}").json() == created

    changed = _patch(caller, f"/v1/webhooks/{created['id']}",
                     {"url": "http://localhost:8/other", "events": ["job.cancelled"],
                      "enabled": False})
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert (body["url"], body["events"], body["enabled"]) == (
        "http://localhost:8/other", ["job.cancelled"], False)
    assert body["description"] == "ci"  # left out: unchanged
    refused = _patch(caller, f"/v1/webhooks/{created['id']}", {"url": "ftp://example.com/"})
    assert refused.status_code == 422 and refused.json()["field"] == "url"
    bad_event = _patch(caller, f"/v1/webhooks/{created['id']}", {"events": ["job.started"]})
    assert bad_event.status_code == 422, bad_event.text

    # Another tenant sees none of it; a key of scope embed may not manage webhooks.
    other = hooks_api.tenant("other")
    for path in (f"/v1/webhooks/{created['id']}", f"/v1/webhooks/{created['id']}/deliveries"):
        assert other.get(path).status_code == 404
    assert other.delete(f"/v1/webhooks/{created['id']}").status_code == 404
    assert _patch(other, f"/v1/webhooks/{created['id']}", {"enabled": True}).status_code == 404
    assert other.get("/v1/webhooks").json()["count"] == 0
    embed_key = caller.post("/v1/api-keys", json={"scope": "embed"}).json()["key"]
    embed = Caller(hooks_api, caller.tenant_id, embed_key)
    assert embed.get("/v1/webhooks").status_code == 403

    assert caller.delete(f"/v1/webhooks/{created['id']}").status_code == 204
    assert caller.get(f"/v1/webhooks/{created['id']}").status_code == 404
    assert caller.get("/v1/webhooks").json()["count"] == 1


@pytest.mark.parametrize(("url", "says"), [
    ("ftp://example.com/hook", "scheme must be http or https"),
    ("file:///etc/passwd", "scheme must be http or https"),
    ("hook.example.com/path", "scheme must be http or https"),
    ("http:///no-host", "names no host"),
    ("http://user:pw@127.0.0.1/", "credentials"),
    ("http://127.0.0.1:99999/", "not a valid URL"),
    ("http://no-such-host.invalid/", "does not resolve"),
])
def test_urls_that_are_not_http_targets_are_refused(hooks_api: Api, url: str, says: str) -> None:
    response = hooks_api.tenant().post("/v1/webhooks", json={"url": url})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "validation_error" and body["field"] == "url"
    assert says in body["detail"], body


def test_the_ssrf_guard_refuses_internal_targets_unless_allowed(sqlite_api: Api) -> None:
    # The deployment's defaults: loopback and private targets are refused at registration.
    caller = sqlite_api.tenant()
    for url in ("http://127.0.0.1:8000/", "http://localhost/", "http://[::1]/",
                "http://10.1.2.3/", "http://192.168.0.10/", "http://169.254.169.254/latest",
                "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/"):
        response = caller.post("/v1/webhooks", json={"url": url})
        assert response.status_code == 422, (url, response.text)
        assert "resolves to" in response.json()["detail"], response.json()
    loopback = caller.post("/v1/webhooks", json={"url": "http://127.0.0.1:8000/"}).json()
    assert "TAILOR_WEBHOOK_ALLOW_LOOPBACK" in loopback["detail"]

    base = Settings(_env_file=None)  # type: ignore[call-arg]
    check_url("http://93.184.215.14/", base)  # a public address
    allowing = base.model_copy(update={"webhook_allow_loopback": True,
                                       "webhook_allow_private_networks": True})
    check_url("http://127.0.0.1/", allowing)
    check_url("http://10.1.2.3/", allowing)
    with pytest.raises(TargetRefused, match="link-local"):
        check_url("http://169.254.169.254/", allowing)  # the metadata service: never
    only_loopback = base.model_copy(update={"webhook_allow_loopback": True})
    with pytest.raises(TargetRefused, match="private"):
        check_url("http://10.1.2.3/", only_loopback)


def _deliveries(api: Api, endpoint_id: str) -> list[WebhookDelivery]:
    with api.session() as session:
        return list(session.scalars(select(WebhookDelivery)
                                    .where(WebhookDelivery.endpoint_id == endpoint_id)))


def test_an_api_side_cancel_queues_a_delivery_for_the_endpoints_that_want_it(
    hooks_api: Api,
) -> None:
    caller = hooks_api.tenant()
    wants = _create(caller, events=["job.cancelled"])
    other_events = _create(caller, events=["job.succeeded"])
    disabled = _create(caller, events=["job.cancelled"], enabled=False)
    stranger = _create(hooks_api.tenant("stranger"), events=["job.cancelled"])
    job = caller.job(caller.corpus()["id"])
    assert caller.post(f"/v1/jobs/{job['id']}/cancel").status_code in (200, 202)

    [delivery] = _deliveries(hooks_api, wants["id"])
    assert delivery.event_type == "job.cancelled" and delivery.status == DeliveryStatus.PENDING
    assert delivery.payload["type"] == "job.cancelled"
    assert delivery.payload["data"]["id"] == job["id"]
    assert delivery.payload["data"]["status"] == "cancelled"
    assert delivery.payload["data"]["object"] == "job"
    assert delivery.message_id.startswith("msg_") and delivery.max_attempts >= 1
    for endpoint in (other_events, disabled, stranger):
        assert _deliveries(hooks_api, endpoint["id"]) == []

    listed = caller.get(f"/v1/webhooks/{wants['id']}/deliveries").json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == delivery.id
    assert listed["data"][0]["attempts"] == 0 and listed["data"][0]["attempt_log"] == []
    assert caller.get(f"/v1/webhooks/{wants['id']}/deliveries",
                      params={"status": "failed"}).json()["count"] == 0

    # Pending: not redelivered (its attempts are still running); another endpoint's id is 404.
    path = f"/v1/webhooks/{wants['id']}/deliveries/{delivery.id}/redeliver"
    pending = caller.post(path)
    assert pending.status_code == 409 and pending.json()["error"] == "invalid_state"
    elsewhere = f"/v1/webhooks/{other_events['id']}/deliveries/{delivery.id}/redeliver"
    assert caller.post(elsewhere).status_code == 404
    assert hooks_api.tenant("x").post(path).status_code == 404

    # Finished (failed): a redelivery grants a fresh round of attempts.
    with hooks_api.session() as session:
        row = session.get(WebhookDelivery, delivery.id)
        assert row is not None
        row.status, row.attempts, row.next_attempt_at = DeliveryStatus.FAILED, 3, None
        session.commit()
    again = caller.post(path)
    assert again.status_code == 202, again.text
    body = again.json()
    assert body["status"] == "pending" and body["attempts"] == 3
    assert body["max_attempts"] == 3 + hooks_api.settings.webhook_max_attempts
    assert body["next_attempt_at"] is not None

    # Deleting the endpoint deletes its log.
    assert caller.delete(f"/v1/webhooks/{wants['id']}").status_code == 204
    assert _deliveries(hooks_api, wants["id"]) == []


def test_an_endpoint_wanting_nothing_is_refused(hooks_api: Api) -> None:
    response = hooks_api.tenant().post("/v1/webhooks", json={"url": RECEIVER, "events": []})
    assert response.status_code == 422 and response.json()["field"].endswith("events")


def _queued_for(broker_dir: Path, delivery_id: str) -> int:
    """Webhook tasks for `delivery_id` waiting in the filesystem broker."""
    return sum(delivery_id in path.read_text(errors="replace")
               for path in (broker_dir / "queue").glob("*.webhooks.msg"))


def test_a_lost_attempt_is_sent_again_by_the_sweep(sqlite_api: Api, broker_dir: Path) -> None:
    from datetime import timedelta

    from app.db.base import utcnow
    from worker.webhooks import sweep_once

    caller = sqlite_api.tenant()
    endpoint = _create(caller, url="http://93.184.215.14/hook", events=["job.cancelled"])
    job = caller.job(caller.corpus()["id"])
    caller.post(f"/v1/jobs/{job['id']}/cancel")
    [delivery] = _deliveries(sqlite_api, endpoint["id"])
    assert _queued_for(broker_dir, delivery.id) == 1  # sent once the cancel committed
    assert sweep_once() == 0  # due just now: not lost yet
    with sqlite_api.session() as session:
        row = session.get(WebhookDelivery, delivery.id)
        assert row is not None
        row.next_attempt_at = utcnow() - timedelta(minutes=10)  # its task never ran
        session.commit()
    assert sweep_once() == 1
    assert _queued_for(broker_dir, delivery.id) == 2
    assert sweep_once() == 0  # due again from now on: not sent a third time at once


def test_a_target_refused_at_delivery_fails_without_retries(hooks_api: Api) -> None:
    # Registered while loopback was allowed (this API's setting); the worker's settings (the
    # process environment here) refuse loopback: the attempt is refused, and never retried.
    from worker.webhooks import deliver

    caller = hooks_api.tenant()
    endpoint = _create(caller, events=["job.cancelled"])
    job = caller.job(caller.corpus()["id"])
    caller.post(f"/v1/jobs/{job['id']}/cancel")
    [delivery] = _deliveries(hooks_api, endpoint["id"])
    assert deliver(delivery.id, 1) == "failed"
    assert deliver(delivery.id, 1) == "stale"  # a duplicate of that attempt sends nothing
    [done] = _deliveries(hooks_api, endpoint["id"])
    assert done.status == DeliveryStatus.FAILED and done.attempts == 1
    assert done.next_attempt_at is None
    [attempt] = done.attempt_log
    assert attempt["status_code"] is None
    assert attempt["error"].startswith("target refused: 127.0.0.1 resolves to 127.0.0.1")
