"""Per-tenant quotas: jobs queued or running at once, training and bulk embedding alike (429: it
frees up as jobs finish), and bytes stored from uploads (403: only the tenant's deletions, or the
operator, free it). Each limit is
the tenant's own (`tenants.max_*`, set with `tailor set-quota`) or else the deployment's setting.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.corpora.service import on_live_corpus
from app.db.models import (
    ACTIVE_JOB_STATUSES,
    Corpus,
    EmbeddingJob,
    EvalSet,
    Job,
    QuerySet,
    Tenant,
    UploadedModel,
)
from app.errors import QuotaExceeded, StorageQuotaExceeded
from app.settings import Settings


def check_concurrent_jobs(session: Session, tenant: Tenant, default_limit: int) -> None:
    """Refuse (429 quota_exceeded, quota "concurrent_jobs") a job beyond the tenant's limit of
    queued and running jobs. Holds the tenant's row until commit, so two requests at the edge
    cannot both pass."""
    limit = tenant.max_concurrent_jobs or default_limit
    session.execute(select(Tenant.id).where(Tenant.id == tenant.id).with_for_update())
    active = sum(
        session.scalar(
            select(func.count()).select_from(kind)
            .where(kind.tenant_id == tenant.id, kind.status.in_(ACTIVE_JOB_STATUSES))
        ) or 0
        for kind in (Job, EmbeddingJob)
    )
    if active >= limit:
        raise QuotaExceeded(
            f"quota concurrent_jobs: {active} of this tenant's jobs (training and bulk "
            f"embedding) are queued or running, the "
            f"most allowed at once is {limit}; retry when one has finished (or cancel one)",
            quota="concurrent_jobs", limit=limit, used=active,
        )


def stored_bytes(session: Session, tenant_id: str) -> int:
    """Bytes the tenant's live uploads take in the object store (corpora, eval and query sets,
    uploaded models)."""
    total = 0
    for table, live in (
        (Corpus, Corpus.deleted_at.is_(None)),
        (EvalSet, on_live_corpus(EvalSet.corpus_id) & EvalSet.deleted_at.is_(None)),
        (QuerySet, on_live_corpus(QuerySet.corpus_id) & QuerySet.deleted_at.is_(None)),
        (UploadedModel, UploadedModel.id.is_not(None)),
    ):
        total += session.scalar(
            select(func.coalesce(func.sum(table.size_bytes), 0))
            .where(table.tenant_id == tenant_id, live)
        ) or 0
    return int(total)


def check_storage(session: Session, tenant: Tenant, settings: Settings, adding: int) -> None:
    """Refuse (403 quota_exceeded, quota "stored_bytes") an upload of `adding` bytes that would
    take the tenant past its storage limit."""
    limit = (
        tenant.max_stored_bytes if tenant.max_stored_bytes is not None
        else settings.max_stored_bytes
    )
    used = stored_bytes(session, tenant.id)
    if used + adding > limit:
        raise StorageQuotaExceeded(
            f"quota stored_bytes: this upload ({adding} bytes) would take the tenant's stored "
            f"uploads to {used + adding} bytes, past its limit of {limit}; delete a corpus or "
            f"ask the operator for more",
            quota="stored_bytes", limit=limit, used=used, requested=adding,
        )
