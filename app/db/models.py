"""ORM models: the service's tables (docs/architecture.md, "Contract: service data model")."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base, BigIntPK, JSONType, utcnow


class JobStatus(StrEnum):
    """Lifecycle of a job: queued -> running -> succeeded | failed; cancel via cancelling."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


ACTIVE_JOB_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING)
FINISHED_JOB_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class EventKind(StrEnum):
    """What a job event records."""

    STATUS = "status"
    STAGE = "stage"
    PROGRESS = "progress"
    METRIC = "metric"
    WARNING = "warning"


class KeyScope(StrEnum):
    """What an API key may call: `train` every route, `embed` the embedding and rerank routes."""

    TRAIN = "train"
    EMBED = "embed"


class Recommendation(StrEnum):
    """Which model the evaluation recommends serving."""

    TUNED = "tuned"
    BASE = "base"


def _str_enum(enum: type[StrEnum], name: str) -> Enum:
    # VARCHAR + CHECK on every backend (no native PostgreSQL enum: adding a value stays a
    # one-line migration); values, not member names, are stored.
    return Enum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


# The many-to-one relationships below also tell the unit of work to insert parents first.


class Tenant(Base):
    """A customer account: every other resource belongs to exactly one tenant."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Quotas of this tenant; None: the deployment's settings (max_concurrent_jobs...).
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer, default=None)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)


class ApiKey(Base):
    """A tenant's API key, stored as a sha256 hash and found by its first 12 characters."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(12), index=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200), default="")
    scope: Mapped[KeyScope] = mapped_column(
        _str_enum(KeyScope, "key_scope"), default=KeyScope.TRAIN
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class Corpus(Base):
    """An uploaded, validated BEIR corpus (JSONL, plain or gzip) in the object store."""

    __tablename__ = "corpora"
    __table_args__ = (Index("ix_corpora_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255))
    object_key: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    documents: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship()


class EvalSet(Base):
    """Customer relevance judgements (BEIR queries + qrels) for one corpus."""

    __tablename__ = "eval_sets"
    __table_args__ = (Index("ix_eval_sets_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    queries_key: Mapped[str] = mapped_column(String(512))
    qrels_key: Mapped[str] = mapped_column(String(512))
    # Stored bytes of both files (as uploaded): counted against the tenant's storage quota.
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Judged queries, and (query, document) judgements.
    queries: Mapped[int] = mapped_column(Integer)
    judgements: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship()
    corpus: Mapped[Corpus] = relationship()


class QuerySet(Base):
    """A customer's own queries without judgements (e.g. a search log) for one corpus: jobs
    train on them beside the synthetic queries."""

    __tablename__ = "query_sets"
    __table_args__ = (Index("ix_query_sets_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    queries_key: Mapped[str] = mapped_column(String(512))
    # Stored bytes (as uploaded): counted against the tenant's storage quota.
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Distinct queries (repeats of one text, case and spacing aside, count once).
    queries: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship()
    corpus: Mapped[Corpus] = relationship()


class JobState:
    """The columns every kind of job shares, so one lifecycle (app.jobs.lifecycle), one lease
    and one progress reporter (worker.leases, worker.progress) serve them all."""

    status: Mapped[JobStatus] = mapped_column(
        _str_enum(JobStatus, "job_status"), default=JobStatus.QUEUED, index=True
    )
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # {"code": ..., "message": ..., "stage": ...} when failed.
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType, default=None)
    celery_task_id: Mapped[str | None] = mapped_column(String(64), default=None)
    # The worker process running the current stage ("host:pid") and until when its heartbeat
    # vouches for it: a second delivery of that stage waits instead of running beside it.
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # The tenant's own label and key-value pairs (app.metadata); `metadata` is taken by
    # SQLAlchemy, hence the attribute's underscore.
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    # The request that created the job (X-Request-ID): the worker's log lines carry it.
    request_id: Mapped[str | None] = mapped_column(String(128), default=None)
    # Deleted by its tenant (hidden everywhere; its objects go), and when its intermediate
    # objects were removed (app.jobs.retention).
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    purged_at: Mapped[datetime | None] = mapped_column(default=None)


class EventRecord:
    """The columns of every job timeline entry (a `job_id` column is the kind's own)."""

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[EventKind] = mapped_column(_str_enum(EventKind, "event_kind"))
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    progress: Mapped[float | None] = mapped_column(Float, default=None)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


class Job(JobState, Base):
    """One specialization run: the request, its resolved recipe and its progress."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id"), index=True)
    eval_set_id: Mapped[str | None] = mapped_column(ForeignKey("eval_sets.id"), default=None)
    query_set_id: Mapped[str | None] = mapped_column(ForeignKey("query_sets.id"), default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    # sha256 of the canonical request body: a retried Idempotency-Key must carry the same body.
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    # The request as sent (base_model, teacher, generator, preset, overrides...).
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # The resolved RecipeConfig.model_dump(mode="json") the worker runs.
    recipe: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # Plain column, not a foreign key: tuned_models.job_id already points back here.
    model_id: Mapped[str | None] = mapped_column(String(32), default=None)
    recommended: Mapped[Recommendation | None] = mapped_column(
        _str_enum(Recommendation, "recommendation"), default=None
    )
    tenant: Mapped[Tenant] = relationship()
    corpus: Mapped[Corpus] = relationship()
    eval_set: Mapped[EvalSet | None] = relationship()
    query_set: Mapped[QuerySet | None] = relationship()


class JobEvent(EventRecord, Base):
    """An append-only record of a job's status, stage, progress, metrics and warnings."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))

    job: Mapped[Job] = relationship()


class TunedModel(Base):
    """A model a job produced: a sentence-transformers folder archived in the object store."""

    __tablename__ = "tuned_models"
    __table_args__ = (Index("ix_tuned_models_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    base_model: Mapped[str] = mapped_column(String(100))
    object_key: Mapped[str] = mapped_column(String(512))
    folder_key: Mapped[str] = mapped_column(String(512))
    dim: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    recommended: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)

    tenant: Mapped[Tenant] = relationship()
    job: Mapped[Job] = relationship()


class ConsoleSession(Base):
    """A browser signed in to the console with an API key. Its cookie holds a random token;
    only the token's sha256 is stored, with the key it was opened with (revoking that key
    ends the session, and the key itself is never stored)."""

    __tablename__ = "console_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)

    api_key: Mapped[ApiKey] = relationship(lazy="joined")


class UploadedModel(Base):
    """A tenant's own base model: a sentence-transformers folder it uploaded, validated (safe
    archive, safetensors weights, config, tokenizer, pooling, a test encode) and stored like a
    tuned model (`models/<id>/model.tar.gz` and `models/<id>/model/`). Its `mdl_` id names it
    on the embedding routes, as a job's base_model, and for bulk embedding."""

    __tablename__ = "uploaded_models"
    __table_args__ = (Index("ix_uploaded_models_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255))
    object_key: Mapped[str] = mapped_column(String(512))
    folder_key: Mapped[str] = mapped_column(String(512))
    # The archive as uploaded: its size and sha256.
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    # The ModelSpec read from its sentence-transformers files (pooling, prompts, max length).
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)

    tenant: Mapped[Tenant] = relationship()


class EmbeddingJob(JobState, Base):
    """A bulk embedding of a stored corpus with one model: its vectors go to the object store
    in shards under `embedding-jobs/<id>/`, a manifest listing the finished ones."""

    __tablename__ = "embedding_jobs"
    __table_args__ = (Index("ix_embedding_jobs_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id"), index=True)
    # As requested: a base model's name or a tenant model's `mdl_` id.
    model: Mapped[str] = mapped_column(String(100))
    # The request as sent plus what was fixed at creation (shard size), so a resumed run
    # writes the same shards.
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)

    tenant: Mapped[Tenant] = relationship()
    corpus: Mapped[Corpus] = relationship()


class EmbeddingJobEvent(EventRecord, Base):
    """An entry of a bulk embedding job's timeline (same shape as a training job's)."""

    __tablename__ = "embedding_job_events"
    __table_args__ = (Index("ix_embedding_job_events_job_id_id", "job_id", "id"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("embedding_jobs.id", ondelete="CASCADE"))

    job: Mapped[EmbeddingJob] = relationship()


# A job of either kind, and how its id tells which: training jobs are `job_...`, bulk
# embedding jobs `emb_...` (app.ids), so code that holds only an id (a task's argument, the
# lease sweep, a revoke) finds the right tables.
AnyJob = Job | EmbeddingJob
AnyJobEvent = JobEvent | EmbeddingJobEvent
EMBEDDING_JOB_PREFIX = "emb_"


def job_tables(job_id: str) -> tuple[type[Job] | type[EmbeddingJob],
                                     type[JobEvent] | type[EmbeddingJobEvent]]:
    """The row and event models of the job `job_id`."""
    if job_id.startswith(EMBEDDING_JOB_PREFIX):
        return EmbeddingJob, EmbeddingJobEvent
    return Job, JobEvent


class DeliveryStatus(StrEnum):
    """Where a webhook delivery stands: pending (an attempt is queued or due), succeeded (a
    2xx answer), failed (every attempt spent, or the target refused)."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class WebhookEndpoint(Base):
    """A tenant's webhook receiver: the URL, the event types it wants and the secret that signs
    what it is sent (Standard Webhooks). The secret is kept as given out (`whsec_...`): signing
    needs it, so unlike an API key it cannot be stored as a hash."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str] = mapped_column(String(200), default="")
    events: Mapped[list[str]] = mapped_column(JSONType, default=list)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    tenant: Mapped[Tenant] = relationship()


class WebhookDelivery(Base):
    """One event sent (or to be sent) to one endpoint, with every attempt so far: the message
    id (`webhook-id`) stays the same across attempts and redeliveries, so receivers can drop
    duplicates."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
        Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    message_id: Mapped[str] = mapped_column(String(32))
    event_type: Mapped[str] = mapped_column(String(64))
    # The body as sent: {"type", "timestamp", "data"}.
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[DeliveryStatus] = mapped_column(
        _str_enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.PENDING
    )
    # Attempts made; each is {"attempt", "at", "status_code", "latency_ms", "error"}.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    attempt_log: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    # Attempts allowed in this round (a redelivery grants a fresh round).
    max_attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    # A worker sending an attempt holds the delivery until then (a duplicate task waits out).
    claimed_until: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    endpoint: Mapped[WebhookEndpoint] = relationship()
