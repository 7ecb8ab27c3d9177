"""Initial schema: tenants, API keys, corpora, eval sets, jobs, job events, tuned models.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelling", "cancelled")
EVENT_KINDS = ("status", "stage", "progress", "metric", "warning")
RECOMMENDATIONS = ("tuned", "base")


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _id(name: str = "id") -> sa.Column:
    return sa.Column(name, sa.String(32), nullable=False)


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"],
        ["tenants.id"],
        name=op.f(f"fk_{table}_tenant_id_tenants"),
        ondelete="CASCADE",
    )


def _one_of(table: str, column: str, name: str, values: Sequence[str]) -> sa.CheckConstraint:
    listed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=op.f(f"ck_{table}_{name}"))


def _enum(name: str, values: Sequence[str]) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=False, length=16)


def upgrade() -> None:
    op.create_table(
        "tenants",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
    )
    op.create_table(
        "api_keys",
        _id(),
        _id("tenant_id"),
        sa.Column("prefix", sa.String(12), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        _tenant_fk("api_keys"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
    )
    op.create_index(op.f("ix_api_keys_prefix"), "api_keys", ["prefix"])
    op.create_index(op.f("ix_api_keys_tenant_id"), "api_keys", ["tenant_id"])

    op.create_table(
        "corpora",
        _id(),
        _id("tenant_id"),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("object_key", sa.String(512), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("documents", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("deleted_at", nullable=True),
        _tenant_fk("corpora"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corpora")),
    )
    op.create_index("ix_corpora_tenant_created", "corpora", ["tenant_id", "created_at"])

    op.create_table(
        "eval_sets",
        _id(),
        _id("tenant_id"),
        _id("corpus_id"),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("queries_key", sa.String(512), nullable=False),
        sa.Column("qrels_key", sa.String(512), nullable=False),
        sa.Column("queries", sa.Integer(), nullable=False),
        sa.Column("judgements", sa.Integer(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["corpus_id"], ["corpora.id"], name=op.f("fk_eval_sets_corpus_id_corpora")
        ),
        _tenant_fk("eval_sets"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_sets")),
    )
    op.create_index(op.f("ix_eval_sets_corpus_id"), "eval_sets", ["corpus_id"])
    op.create_index("ix_eval_sets_tenant_created", "eval_sets", ["tenant_id", "created_at"])

    op.create_table(
        "jobs",
        _id(),
        _id("tenant_id"),
        _id("corpus_id"),
        sa.Column("eval_set_id", sa.String(32), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("spec", _json(), nullable=False),
        sa.Column("recipe", _json(), nullable=False),
        sa.Column("status", _enum("job_status", JOB_STATUSES), nullable=False),
        sa.Column("stage", sa.String(32), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("metrics", _json(), nullable=False),
        sa.Column("error", _json(), nullable=True),
        sa.Column("celery_task_id", sa.String(64), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(32), nullable=True),
        sa.Column("recommended", _enum("recommendation", RECOMMENDATIONS), nullable=True),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        _ts("updated_at"),
        _one_of("jobs", "status", "job_status", JOB_STATUSES),
        _one_of("jobs", "recommended", "recommendation", RECOMMENDATIONS),
        sa.ForeignKeyConstraint(
            ["corpus_id"], ["corpora.id"], name=op.f("fk_jobs_corpus_id_corpora")
        ),
        sa.ForeignKeyConstraint(
            ["eval_set_id"], ["eval_sets.id"], name=op.f("fk_jobs_eval_set_id_eval_sets")
        ),
        _tenant_fk("jobs"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint(
            "tenant_id", "idempotency_key", name=op.f("uq_jobs_tenant_id_idempotency_key")
        ),
    )
    op.create_index(op.f("ix_jobs_corpus_id"), "jobs", ["corpus_id"])
    op.create_index(op.f("ix_jobs_status"), "jobs", ["status"])
    op.create_index("ix_jobs_tenant_created", "jobs", ["tenant_id", "created_at"])

    op.create_table(
        "job_events",
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
        _one_of("job_events", "kind", "event_kind", EVENT_KINDS),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
    )
    op.create_index("ix_job_events_job_id_id", "job_events", ["job_id", "id"])

    op.create_table(
        "tuned_models",
        _id(),
        _id("tenant_id"),
        _id("job_id"),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("base_model", sa.String(100), nullable=False),
        sa.Column("object_key", sa.String(512), nullable=False),
        sa.Column("folder_key", sa.String(512), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("metrics", _json(), nullable=False),
        sa.Column("recommended", sa.Boolean(), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_tuned_models_job_id_jobs")),
        _tenant_fk("tuned_models"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tuned_models")),
    )
    op.create_index(op.f("ix_tuned_models_job_id"), "tuned_models", ["job_id"])
    op.create_index("ix_tuned_models_tenant_created", "tuned_models", ["tenant_id", "created_at"])


def downgrade() -> None:
    for table in ("tuned_models", "job_events", "jobs", "eval_sets", "corpora", "api_keys"):
        op.drop_table(table)
    op.drop_table("tenants")
