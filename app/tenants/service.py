"""Create tenants and API keys; verify a presented key (from the process's cache when it can)."""

from __future__ import annotations

import hmac
from datetime import datetime

from sqlalchemy import event, select
from sqlalchemy.orm import Session, make_transient_to_detached

from app.db.base import utcnow
from app.db.models import ApiKey, KeyScope, Tenant
from app.ids import (
    API_KEY_LOOKUP_CHARS,
    API_KEY_PREFIX,
    api_key_lookup_prefix,
    hash_api_key,
    new_api_key,
    new_id,
)
from app.tenants.key_cache import KEYS, VerifiedKey


def create_tenant(session: Session, name: str) -> tuple[Tenant, str]:
    """A new tenant and its first API key; the key is returned once and stored only hashed."""
    tenant = Tenant(id=new_id("ten"), name=name)
    session.add(tenant)
    _, key = create_api_key(session, tenant)
    return tenant, key


def create_api_key(
    session: Session,
    tenant: Tenant,
    *,
    name: str = "",
    scope: KeyScope = KeyScope.TRAIN,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """A new API key for `tenant`: (row, secret key shown once)."""
    key = new_api_key()
    row = ApiKey(
        id=new_id("key"),
        tenant=tenant,
        prefix=api_key_lookup_prefix(key),
        key_hash=hash_api_key(key),
        name=name,
        scope=scope,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row, key


def revoke_api_key(session: Session, key_id: str, tenant_id: str | None = None) -> bool:
    """Revoke a key by id (of `tenant_id` when given); False when no active key has that id.
    This process stops accepting it at once and again after the commit (a request verifying
    it in between would otherwise cache the row as it was before)."""
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None:
        return False
    if tenant_id is not None and row.tenant_id != tenant_id:
        return False
    row.revoked_at = utcnow()
    session.flush()
    KEYS.forget(key_id)
    event.listen(session, "after_commit", lambda _: KEYS.forget(key_id), once=True)
    return True


def _snapshot(tenant: Tenant) -> Tenant:
    """A detached copy of the tenant's row that requests can attach without a query."""
    copy = Tenant(
        id=tenant.id, name=tenant.name, created_at=tenant.created_at,
        max_concurrent_jobs=tenant.max_concurrent_jobs, max_stored_bytes=tenant.max_stored_bytes,
    )
    make_transient_to_detached(copy)
    return copy


def _lookup(session: Session, key: str, digest: str) -> VerifiedKey | None:
    rows = session.scalars(
        select(ApiKey).where(
            ApiKey.prefix == api_key_lookup_prefix(key), ApiKey.revoked_at.is_(None)
        )
    )
    for row in rows:
        # Constant-time comparison: response timing says nothing about how much of a hash matched.
        if hmac.compare_digest(row.key_hash, digest):
            return VerifiedKey(key_id=row.id, scope=row.scope, expires_at=row.expires_at,
                               tenant=_snapshot(row.tenant))
    return None


def _well_formed(key: str) -> bool:
    return key.startswith(API_KEY_PREFIX) and len(key) > API_KEY_LOOKUP_CHARS


def cached_key(key: str, ttl_s: float) -> VerifiedKey | None:
    """The key as verified less than `ttl_s` seconds ago in this process, or None."""
    if ttl_s <= 0 or not _well_formed(key):
        return None
    return KEYS.get(hash_api_key(key), ttl_s)


def verify_key(session: Session, key: str, cache_ttl_s: float = 0.0) -> VerifiedKey | None:
    """The active key `key` (not revoked; it may have expired: see `is_expired`), or None.
    Within `cache_ttl_s` of an earlier verification it is answered without the database."""
    if not _well_formed(key):
        return None
    cached = cached_key(key, cache_ttl_s)
    if cached is not None:
        return cached
    digest = hash_api_key(key)
    verified = _lookup(session, key, digest)
    if verified is not None and cache_ttl_s > 0:
        KEYS.put(digest, verified)
    return verified


def authenticate(session: Session, key: str) -> Tenant | None:
    """The tenant owning the active, unexpired key `key`, or None (always asks the database)."""
    verified = verify_key(session, key)
    if verified is None or is_expired(verified):
        return None
    return session.merge(verified.tenant, load=False)


def is_expired(verified: VerifiedKey) -> bool:
    """Whether the key's expiry has passed."""
    return verified.expires_at is not None and verified.expires_at <= utcnow()


def list_api_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    """The tenant's keys, revoked and expired ones included, newest first."""
    return list(session.scalars(
        select(ApiKey).where(ApiKey.tenant_id == tenant_id)
        .order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
    ))
