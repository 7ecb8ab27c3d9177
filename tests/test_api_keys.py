"""Keys a tenant manages itself: create (shown once), list, read, revoke; scope and expiry; the
in-process cache that spares the database on every request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, update

from app.db.base import utcnow
from app.db.models import ApiKey
from app.tenants.key_cache import KEYS
from tests.api_support import Api, Caller, start_api

pytest_plugins = ["tests.api_fixtures"]


def _as(caller: Caller, key: str) -> Caller:
    return Caller(caller.api, caller.tenant_id, key)


def _create(caller: Caller, **body: Any) -> dict[str, Any]:
    response = caller.post("/v1/api-keys", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_a_tenant_creates_lists_and_revokes_its_keys(api: Api) -> None:
    caller = api.tenant()
    created = _create(caller, name="search service", scope="train", expires_in_days=30)
    secret = created.pop("key")
    assert secret.startswith("tlr_") and secret.startswith(created["prefix"])
    assert created["name"] == "search service" and created["status"] == "active"
    assert created["expires_at"] is not None
    second = _as(caller, secret)
    assert second.get("/v1/corpora").status_code == 200

    listing = caller.get("/v1/api-keys").json()
    assert listing["count"] == 2  # the tenant's first key and the new one
    assert listing["data"][0] == created  # newest first, and no secret anywhere
    assert secret not in str(listing) and "key_hash" not in str(listing)
    assert caller.get(f"/v1/api-keys/{created['id']}").json() == created

    # A key may revoke itself; it stops working on the next request (this process at once).
    assert second.delete(f"/v1/api-keys/{created['id']}").status_code == 204
    refused = second.get("/v1/corpora")
    assert refused.status_code == 401, refused.text
    revoked = caller.get(f"/v1/api-keys/{created['id']}").json()
    assert revoked["status"] == "revoked" and revoked["revoked_at"] is not None
    assert caller.delete(f"/v1/api-keys/{created['id']}").status_code == 204  # idempotent

    # Another tenant sees none of it and cannot revoke it.
    other = api.tenant("other")
    assert other.get(f"/v1/api-keys/{created['id']}").status_code == 404
    assert other.delete(f"/v1/api-keys/{caller_key_id(api, caller)}").status_code == 404
    assert caller.get("/v1/corpora").status_code == 200
    assert other.get("/v1/api-keys").json()["count"] == 1


def caller_key_id(api: Api, caller: Caller) -> str:
    with api.session() as session:
        return session.query(ApiKey.id).filter_by(prefix=caller.key[:12]).scalar()


def test_an_embed_key_reaches_the_embedding_routes_only(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    embed = _as(caller, _create(caller, scope="embed")["key"])
    response = embed.post("/v1/embed", json={"model": "tiny-student", "inputs": ["wing"]})
    assert response.status_code == 200, response.text
    response = embed.post("/v1/embeddings", json={"model": "tiny-student", "input": "wing"})
    assert response.status_code == 200, response.text
    response = embed.post("/v1/rerank", json={"model": "tiny-teacher", "query": "wing",
                                              "documents": ["wing flutter", "heat"]})
    assert response.status_code == 200, response.text
    assert embed.get("/v1/rerank/models").status_code == 200
    for method, url in (("GET", "/v1/corpora"), ("POST", "/v1/jobs"), ("GET", "/v1/models"),
                        ("POST", "/v1/api-keys"), ("GET", "/v1/api-keys")):
        response = sqlite_api.client.request(method, url, headers=embed.headers, json={})
        assert response.status_code == 403, (method, url, response.text)
        body = response.json()
        assert (body["error"], body["scope"], body["required"]) == (
            "insufficient_scope", "embed", "train")


def test_an_expired_key_is_refused(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    created = _create(caller, expires_in_days=1)
    with sqlite_api.session() as session:
        session.execute(update(ApiKey).where(ApiKey.id == created["id"])
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    response = _as(caller, created["key"]).get("/v1/corpora")
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]
    assert caller.get(f"/v1/api-keys/{created['id']}").json()["status"] == "expired"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"scope": "admin"}, "scope"),
        ({"expires_in_days": 0}, "expires_in_days"),
        ({"expires_in_days": 3651}, "expires_in_days"),
        ({"expires_in_days": True}, "expires_in_days"),
        ({"name": "n" * 201}, "name"),
        ({"key": "tlr_chosen_by_me"}, "key"),
    ],
)
def test_key_requests_are_validated(sqlite_api: Api, body: dict[str, Any], field: str) -> None:
    response = sqlite_api.tenant().post("/v1/api-keys", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field


@contextmanager
def _statements(api: Api) -> Iterator[list[str]]:
    """The SQL statements the app's engine runs inside the block."""
    seen: list[str] = []
    engine = api.app.state.engine

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_a_known_key_costs_no_database_round_trip(sqlite_api: Api) -> None:
    caller = sqlite_api.tenant()
    body = {"model": "tiny-student", "inputs": ["wing"]}
    assert caller.post("/v1/embed", json=body).status_code == 200  # verifies and caches the key
    with _statements(sqlite_api) as seen:
        for _ in range(3):
            assert caller.post("/v1/embed", json=body).status_code == 200
    assert seen == []


@pytest.fixture
def short_cache_api(tmp_path: Path, sqlite_url: str, model_store: Path,
                    broker_dir: Path) -> Iterator[Api]:
    yield from start_api(tmp_path, sqlite_url, model_store, api_key_cache_ttl_s=0.5)


def test_a_key_revoked_elsewhere_stops_working_within_the_cache_lifetime(
    short_cache_api: Api,
) -> None:
    caller = short_cache_api.tenant()
    assert caller.get("/v1/corpora").status_code == 200
    # Another API process revokes it: the row changes, this process's cache does not hear of it.
    with short_cache_api.session() as session:
        session.execute(update(ApiKey).where(ApiKey.prefix == caller.key[:12])
                        .values(revoked_at=utcnow()))
        session.commit()
    assert caller.get("/v1/corpora").status_code == 200  # still trusted for a moment
    time.sleep(0.6)
    assert caller.get("/v1/corpora").status_code == 401


def test_the_cache_holds_only_keys_that_verified(sqlite_api: Api) -> None:
    KEYS.clear()
    for i in range(10):
        sqlite_api.client.get("/v1/corpora", headers={"Authorization": f"Bearer tlr_{i:040d}"})
    assert len(KEYS._entries) == 0
    sqlite_api.tenant().get("/v1/corpora")
    assert len(KEYS._entries) == 1
