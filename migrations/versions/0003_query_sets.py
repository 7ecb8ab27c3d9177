"""Query sets: a customer's own queries without judgements, which a job trains on.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "query_sets",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("corpus_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("queries_key", sa.String(512), nullable=False),
        sa.Column("queries", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["corpus_id"], ["corpora.id"], name=op.f("fk_query_sets_corpus_id_corpora")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_query_sets_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_query_sets")),
    )
    op.create_index(op.f("ix_query_sets_corpus_id"), "query_sets", ["corpus_id"])
    op.create_index("ix_query_sets_tenant_created", "query_sets", ["tenant_id", "created_at"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("query_set_id", sa.String(32), nullable=True))
        batch.create_foreign_key(
            op.f("fk_jobs_query_set_id_query_sets"), "query_sets", ["query_set_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("fk_jobs_query_set_id_query_sets"), type_="foreignkey")
        batch.drop_column("query_set_id")
    op.drop_index("ix_query_sets_tenant_created", table_name="query_sets")
    op.drop_index(op.f("ix_query_sets_corpus_id"), table_name="query_sets")
    op.drop_table("query_sets")
