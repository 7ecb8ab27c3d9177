"""Migration 0008 (webhooks) on both databases: the tables take an endpoint and its deliveries,
the database refuses an unknown delivery status, and the migration goes down and up again."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect, text

from app.db.base import utcnow
from app.db.migrate import alembic_config, upgrade
from app.db.session import make_engine

pytest_plugins = ["tests.api_fixtures"]


def test_webhook_tables_come_and_go(fresh_url: str) -> None:
    upgrade(fresh_url, "0008")
    engine = make_engine(fresh_url)
    try:
        now = {"now": utcnow()}
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO tenants (id, name, created_at) "
                                    "VALUES ('ten_a', 'a', :now)"), now)
            connection.execute(text(
                "INSERT INTO webhook_endpoints (id, tenant_id, url, description, events, "
                "enabled, secret, created_at, updated_at) VALUES ('whk_a', 'ten_a', "
                "'https://example.com/', '', '[\"job.failed\"]', true, 'whsec_x', :now, :now)"),
                now)
            delivery = ("INSERT INTO webhook_deliveries (id, tenant_id, endpoint_id, message_id, "
                        "event_type, payload, status, attempts, attempt_log, max_attempts, "
                        "created_at, updated_at) VALUES (:id, 'ten_a', 'whk_a', 'msg_a', "
                        "'job.failed', '{}', :status, 0, '[]', 3, :now, :now)")
            connection.execute(text(delivery), {"id": "whd_a", "status": "pending", **now})
        with pytest.raises(Exception, match="(?i)check|constraint"), engine.begin() as connection:
            connection.execute(text(delivery), {"id": "whd_b", "status": "lost", **now})
        # Deleting the tenant deletes its endpoints and their deliveries.
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM tenants WHERE id = 'ten_a'"))
            assert connection.execute(text("SELECT count(*) FROM webhook_deliveries")).scalar() == 0
        command.downgrade(alembic_config(fresh_url), "0007")
        assert not {"webhook_endpoints", "webhook_deliveries"} & set(
            inspect(engine).get_table_names())
        upgrade(fresh_url)
        assert {"webhook_endpoints", "webhook_deliveries"} <= set(
            inspect(engine).get_table_names())
    finally:
        engine.dispose()
