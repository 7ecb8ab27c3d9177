"""Create tenants and API keys; authenticate a presented key."""

from __future__ import annotations

import hmac

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ApiKey, Tenant
from app.ids import (
    API_KEY_LOOKUP_CHARS,
    API_KEY_PREFIX,
    api_key_lookup_prefix,
    hash_api_key,
    new_api_key,
    new_id,
)


def create_tenant(session: Session, name: str) -> tuple[Tenant, str]:
    """A new tenant and its first API key; the key is returned once and stored only hashed."""
    tenant = Tenant(id=new_id("ten"), name=name)
    session.add(tenant)
    _, key = create_api_key(session, tenant)
    return tenant, key


def create_api_key(session: Session, tenant: Tenant) -> tuple[ApiKey, str]:
    """A new API key for `tenant`: (row, secret key shown once)."""
    key = new_api_key()
    row = ApiKey(
        id=new_id("key"),
        tenant=tenant,
        prefix=api_key_lookup_prefix(key),
        key_hash=hash_api_key(key),
    )
    session.add(row)
    session.flush()
    return row, key


def revoke_api_key(session: Session, key_id: str) -> bool:
    """Revoke a key by id; False when no active key has that id."""
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    session.flush()
    return True


def authenticate(session: Session, key: str) -> Tenant | None:
    """The tenant owning the active key `key`, or None."""
    if not key.startswith(API_KEY_PREFIX) or len(key) <= API_KEY_LOOKUP_CHARS:
        return None
    digest = hash_api_key(key)
    rows = session.scalars(
        select(ApiKey).where(
            ApiKey.prefix == api_key_lookup_prefix(key), ApiKey.revoked_at.is_(None)
        )
    )
    for row in rows:
        # Constant-time comparison: response timing says nothing about how much of a hash matched.
        if hmac.compare_digest(row.key_hash, digest):
            return row.tenant
    return None
