"""Corpus rules: validate before storing, tenant-scoped reads, delete only when unused."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ACTIVE_JOB_STATUSES, Corpus, EmbeddingJob, Job, Tenant
from app.db.tenant_rows import newest_first
from app.deps import Page
from app.errors import InvalidCorpus, NotFound, ResourceInUse
from app.ids import new_id
from app.storage import ObjectStore, stored_until_committed
from app.uploads import SpooledFile
from ml_core.corpus import CorpusError, validate_corpus

log = logging.getLogger(__name__)


def corpus_prefix(corpus_id: str) -> str:
    """Object-store folder of a corpus."""
    return f"corpora/{corpus_id}/"


def create_corpus(
    session: Session, store: ObjectStore, tenant: Tenant, upload: SpooledFile, name: str
) -> Corpus:
    """Validate every record of the spooled upload, then store it and record the corpus."""
    try:
        stats = validate_corpus(upload.path)
    except CorpusError as exc:
        # Nothing has been stored yet: an invalid file leaves no trace.
        raise InvalidCorpus(
            f"{upload.filename}: {exc.message}", file="file", line=exc.line, field=exc.field
        ) from exc
    corpus_id = new_id("crp")
    key = corpus_prefix(corpus_id) + ("corpus.jsonl.gz" if upload.gzipped else "corpus.jsonl")
    corpus = Corpus(
        id=corpus_id,
        tenant_id=tenant.id,
        name=name or upload.default_name,
        filename=upload.filename,
        object_key=key,
        size_bytes=upload.size,
        sha256=stats.sha256,
        documents=stats.documents,
    )
    # Committed here, not when the request ends: a row that cannot be written must not leave
    # its file behind.
    with stored_until_committed(session, store, corpus_prefix(corpus_id)):
        store.put_file(key, upload.path)
        session.add(corpus)
    return corpus


def get_corpus(session: Session, tenant: Tenant, corpus_id: str, *, lock: bool = False) -> Corpus:
    """The tenant's live corpus `corpus_id` (404 otherwise); `lock` holds it until commit."""
    query = select(Corpus).where(
        Corpus.id == corpus_id, Corpus.tenant_id == tenant.id, Corpus.deleted_at.is_(None)
    )
    if lock:
        query = query.with_for_update()
    corpus = session.scalar(query)
    if corpus is None:
        raise NotFound(f"corpus {corpus_id} not found", resource="corpus", id=corpus_id)
    return corpus


def on_live_corpus(corpus_id: Any) -> ColumnElement[bool]:
    """Rows (eval sets, query sets) whose corpus has not been deleted: what is built on a
    deleted corpus is gone with it."""
    return corpus_id.in_(select(Corpus.id).where(Corpus.deleted_at.is_(None)))


def list_corpora(session: Session, tenant: Tenant, page: Page) -> tuple[list[Corpus], int]:
    """A page of the tenant's live corpora, newest first, and their total."""
    live = (Corpus.tenant_id == tenant.id, Corpus.deleted_at.is_(None))
    return newest_first(session, Corpus, page, *live)


def delete_corpus(session: Session, tenant: Tenant, corpus_id: str) -> Corpus:
    """Soft-delete a corpus no active job uses (409 otherwise); the caller deletes its objects
    after the commit."""
    corpus = get_corpus(session, tenant, corpus_id, lock=True)
    active = None
    for table in (Job, EmbeddingJob):
        active = active or session.scalar(
            select(table.id)
            .where(table.corpus_id == corpus.id, table.status.in_(ACTIVE_JOB_STATUSES))
            .limit(1)
        )
    if active is not None:
        raise ResourceInUse(
            f"corpus {corpus_id} is used by job {active}, which has not finished",
            resource="corpus",
            id=corpus_id,
            job_id=active,
        )
    corpus.deleted_at = utcnow()
    session.flush()
    return corpus


def delete_corpus_objects(store: ObjectStore, corpus: Corpus) -> None:
    """Remove a deleted corpus's file from the object store (best effort, logged)."""
    try:
        store.delete_prefix(corpus_prefix(corpus.id))
    except Exception:
        log.exception("could not delete the objects of corpus %s", corpus.id)
