"""Lifecycle: names and metadata on jobs and models, deletion, the creating request's id.

Jobs (training and bulk embedding) and models take a `name` and `metadata` (at most 16 string
pairs). Jobs, bulk embedding
jobs, eval sets and query sets are deleted softly (`deleted_at`): finished jobs and tuned models
keep pointing at what they were built from, while the stored objects go. `purged_at` records
when a job's intermediate objects were removed (a cancelled or failed job's after the retention
period, a deleted job's at once). `request_id` is the id of the request that created a job, so
the worker's log lines name it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_TABLES = ("jobs", "embedding_jobs")
SOFT_DELETED = ("jobs", "embedding_jobs", "eval_sets", "query_sets")
WITH_METADATA = ("jobs", "embedding_jobs", "tuned_models", "uploaded_models")


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _ts(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=True)


def upgrade() -> None:
    for table in JOB_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("name", sa.String(200), nullable=True))
    for table in WITH_METADATA:
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("metadata", _json(), nullable=False, server_default=sa.text("'{}'"))
            )
    for table in JOB_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("request_id", sa.String(128), nullable=True))
            batch.add_column(_ts("purged_at"))
    for table in SOFT_DELETED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(_ts("deleted_at"))


def downgrade() -> None:
    for table in SOFT_DELETED:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("deleted_at")
    for table in JOB_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("purged_at")
            batch.drop_column("request_id")
    for table in WITH_METADATA:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("metadata")
    for table in JOB_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("name")
