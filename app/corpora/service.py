"""Corpus rules: validate before storing, tenant-scoped reads, delete when unused (or cancel
what uses it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Corpus, EvalSet, JobStatus, QuerySet, Tenant
from app.db.tenant_rows import newest_first
from app.dependants import active_jobs_using, refuse_if_used
from app.deps import Page
from app.errors import InvalidCorpus, NotFound
from app.ids import new_id
from app.jobs.lifecycle import request_cancel
from app.storage import ObjectStore, delete_objects, stored_until_committed
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


@dataclass
class CorpusDeletion:
    """What deleting a corpus did: the corpus, the tasks of cancelled jobs to revoke, and the
    object-store folders to empty after the commit."""

    corpus: Corpus
    revoke: list[str] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)


def delete_corpus(
    session: Session, tenant: Tenant, corpus_id: str, *, cascade: bool = False
) -> CorpusDeletion:
    """Soft-delete a corpus with the eval and query sets built on it. Jobs not yet finished
    that use it block it (409 naming them in `job_ids`) unless `cascade`, which cancels them
    first. Finished jobs and the models they tuned stay. The caller commits, revokes and
    deletes the objects (delete_corpus_objects)."""
    corpus = get_corpus(session, tenant, corpus_id, lock=True)
    users = active_jobs_using(session, tenant.id, corpus_id=corpus.id)
    if not cascade:
        refuse_if_used("corpus", corpus.id, users,
                       hint="cancel them first, or delete with ?cascade=true to cancel them")
    deletion = CorpusDeletion(corpus, prefixes=[corpus_prefix(corpus.id)])
    for job in users:
        request_cancel(session, job)
        deletion.cancelled.append(job.id)
        if job.status == JobStatus.CANCELLED and job.celery_task_id:
            deletion.revoke.append(job.celery_task_id)
    now = utcnow()
    for table, folder in ((EvalSet, "eval_sets"), (QuerySet, "query_sets")):
        for row in session.scalars(select(table).where(table.corpus_id == corpus.id,
                                                       table.deleted_at.is_(None))):
            row.deleted_at = now
            deletion.prefixes.append(f"{folder}/{row.id}/")
    corpus.deleted_at = now
    session.flush()
    return deletion


def delete_corpus_objects(store: ObjectStore, deletion: CorpusDeletion) -> None:
    """Remove a deleted corpus's file and its sets' files from the object store (best effort,
    logged)."""
    for prefix in deletion.prefixes:
        delete_objects(store, prefix)
