"""Keys a tenant manages (name, scope, expiry), per-tenant quotas, stored sizes of judgements.

Existing keys become `train` keys without an expiry (what they could do before); existing eval
and query sets count 0 stored bytes until re-uploaded (their size was not recorded).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY_SCOPES = ("train", "embed")


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("name", sa.String(200), nullable=False, server_default=""))
        batch.add_column(sa.Column(
            "scope",
            sa.Enum(*KEY_SCOPES, name="key_scope", native_enum=False, create_constraint=False,
                    length=16),
            nullable=False,
            server_default="train",
        ))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        listed = ", ".join(f"'{scope}'" for scope in KEY_SCOPES)
        batch.create_check_constraint(op.f("ck_api_keys_key_scope"), f"scope IN ({listed})")
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("max_concurrent_jobs", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_stored_bytes", sa.BigInteger(), nullable=True))
    for table in ("eval_sets", "query_sets"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("size_bytes", sa.BigInteger(), nullable=False, server_default="0")
            )


def downgrade() -> None:
    for table in ("query_sets", "eval_sets"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("size_bytes")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("max_stored_bytes")
        batch.drop_column("max_concurrent_jobs")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint(op.f("ck_api_keys_key_scope"), type_="check")
        batch.drop_column("expires_at")
        batch.drop_column("scope")
        batch.drop_column("name")
