"""Migration 0005 (API keys) on both databases: a key made before it keeps working as a `train`
key without expiry, and the migration goes down and up again."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.migrate import alembic_config, upgrade
from app.db.models import KeyScope
from app.db.session import make_engine
from app.ids import api_key_lookup_prefix, hash_api_key, new_api_key
from app.tenants.service import verify_key

pytest_plugins = ["tests.api_fixtures"]


def test_a_key_from_before_the_migration_becomes_a_train_key(fresh_url: str) -> None:
    upgrade(fresh_url, "0004")
    key = new_api_key()
    engine = make_engine(fresh_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO tenants (id, name, created_at) "
                                    "VALUES ('ten_old', 'old', :now)"), {"now": utcnow()})
            connection.execute(
                text("INSERT INTO api_keys (id, tenant_id, prefix, key_hash, created_at) "
                     "VALUES ('key_old', 'ten_old', :prefix, :hash, :now)"),
                {"prefix": api_key_lookup_prefix(key), "hash": hash_api_key(key),
                 "now": utcnow()},
            )
        upgrade(fresh_url, "0005")
        with Session(engine) as session:
            verified = verify_key(session, key)
            assert verified is not None
            assert (verified.key_id, verified.tenant_id, verified.scope, verified.expires_at) == (
                "key_old", "ten_old", KeyScope.TRAIN, None)
            assert verified.tenant.max_concurrent_jobs is None
        # The scope is checked by the database too.
        with pytest.raises(Exception, match="(?i)check|constraint"), engine.begin() as connection:
            connection.execute(text("UPDATE api_keys SET scope = 'admin'"))
        command.downgrade(alembic_config(fresh_url), "0004")
        with engine.connect() as connection:
            columns = connection.execute(text("SELECT * FROM api_keys")).keys()
            assert "scope" not in columns
        upgrade(fresh_url)
    finally:
        engine.dispose()
