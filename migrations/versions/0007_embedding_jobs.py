"""Bulk embedding jobs (with their timeline) and tenant-uploaded base models.

An embedding job embeds a stored corpus with one model on the workers and writes the vectors in
shards to the object store; it shares the training job's state columns (status, progress,
lease...) so one lifecycle serves both. An uploaded model is a tenant's own validated
sentence-transformers folder, stored like a tuned model.

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelling", "cancelled")
EVENT_KINDS = ("status", "stage", "progress", "metric", "warning")


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _id(name: str = "id") -> sa.Column:
    return sa.Column(name, sa.String(32), nullable=False)


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"], ["tenants.id"], name=op.f(f"fk_{table}_tenant_id_tenants"),
        ondelete="CASCADE",
    )


def _one_of(table: str, column: str, name: str, values: Sequence[str]) -> sa.CheckConstraint:
    listed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=op.f(f"ck_{table}_{name}"))


def _enum(name: str, values: Sequence[str]) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=False, length=16)


def upgrade() -> None:
    op.create_table(
        "uploaded_models",
        _id(),
        _id("tenant_id"),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("object_key", sa.String(512), nullable=False),
        sa.Column("folder_key", sa.String(512), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("spec", _json(), nullable=False),
        _ts("created_at"),
        _tenant_fk("uploaded_models"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploaded_models")),
    )
    op.create_index(
        "ix_uploaded_models_tenant_created", "uploaded_models", ["tenant_id", "created_at"]
    )

    op.create_table(
        "embedding_jobs",
        _id(),
        _id("tenant_id"),
        _id("corpus_id"),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("spec", _json(), nullable=False),
        sa.Column("status", _enum("job_status", JOB_STATUSES), nullable=False),
        sa.Column("stage", sa.String(32), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("metrics", _json(), nullable=False),
        sa.Column("error", _json(), nullable=True),
        sa.Column("celery_task_id", sa.String(64), nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        _ts("lease_expires_at", nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        _ts("updated_at"),
        _one_of("embedding_jobs", "status", "job_status", JOB_STATUSES),
        sa.ForeignKeyConstraint(
            ["corpus_id"], ["corpora.id"], name=op.f("fk_embedding_jobs_corpus_id_corpora")
        ),
        _tenant_fk("embedding_jobs"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_embedding_jobs")),
    )
    op.create_index(op.f("ix_embedding_jobs_corpus_id"), "embedding_jobs", ["corpus_id"])
    op.create_index(op.f("ix_embedding_jobs_status"), "embedding_jobs", ["status"])
    op.create_index(
        "ix_embedding_jobs_tenant_created", "embedding_jobs", ["tenant_id", "created_at"]
    )

    op.create_table(
        "embedding_job_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        _id("job_id"),
        _ts("created_at"),
        sa.Column("kind", _enum("event_kind", EVENT_KINDS), nullable=False),
        sa.Column("stage", sa.String(32), nullable=True),
        sa.Column("progress", sa.Float(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", _json(), nullable=False),
        _one_of("embedding_job_events", "kind", "event_kind", EVENT_KINDS),
        sa.ForeignKeyConstraint(
            ["job_id"], ["embedding_jobs.id"],
            name=op.f("fk_embedding_job_events_job_id_embedding_jobs"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_embedding_job_events")),
    )
    op.create_index(
        "ix_embedding_job_events_job_id_id", "embedding_job_events", ["job_id", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_embedding_job_events_job_id_id", table_name="embedding_job_events")
    op.drop_table("embedding_job_events")
    for index in ("ix_embedding_jobs_tenant_created", op.f("ix_embedding_jobs_status"),
                  op.f("ix_embedding_jobs_corpus_id")):
        op.drop_index(index, table_name="embedding_jobs")
    op.drop_table("embedding_jobs")
    op.drop_index("ix_uploaded_models_tenant_created", table_name="uploaded_models")
    op.drop_table("uploaded_models")
