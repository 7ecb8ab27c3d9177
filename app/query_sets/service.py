"""Query set rules: a readable BEIR queries file for one of the tenant's corpora."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.corpora.service import get_corpus, on_live_corpus
from app.db.base import utcnow
from app.db.models import QuerySet, Tenant
from app.db.tenant_rows import newest_first, owned
from app.dependants import active_jobs_using, refuse_if_used
from app.deps import Page
from app.errors import InvalidQuerySet
from app.ids import new_id
from app.storage import ObjectStore, stored_until_committed
from app.uploads import SpooledFile
from ml_core.corpus import CorpusError
from ml_core.stages.generate import read_supplied_queries


def create_query_set(
    session: Session,
    store: ObjectStore,
    tenant: Tenant,
    corpus_id: str,
    name: str,
    queries_file: SpooledFile,
) -> QuerySet:
    """Validate the queries the way a job will read them, store them, record the set."""
    corpus = get_corpus(session, tenant, corpus_id)
    try:
        distinct = len(read_supplied_queries(queries_file.path))
    except CorpusError as exc:
        raise InvalidQuerySet(f"{queries_file.filename}: {exc.message}", file="queries",
                              line=exc.line, field=exc.field) from exc
    if not distinct:
        raise InvalidQuerySet(f"{queries_file.filename}: no query has any text to train on",
                              file="queries", field="text")
    query_set_id = new_id("qrs")
    queries_key = f"query_sets/{query_set_id}/queries.jsonl"
    query_set = QuerySet(
        id=query_set_id,
        tenant_id=tenant.id,
        corpus_id=corpus.id,
        name=name or queries_file.default_name,
        queries_key=queries_key,
        queries=distinct,
        size_bytes=queries_file.size,
    )
    # Committed here, so a row that cannot be written leaves no stored file behind.
    with stored_until_committed(session, store, f"query_sets/{query_set_id}/"):
        store.put_file(queries_key, queries_file.path)
        session.add(query_set)
    return query_set


def get_query_set(session: Session, tenant: Tenant, query_set_id: str) -> QuerySet:
    """The tenant's query set `query_set_id` (404 otherwise)."""
    live = on_live_corpus(QuerySet.corpus_id)
    return owned(session, QuerySet, tenant.id, query_set_id, "query_set", live,
                 QuerySet.deleted_at.is_(None))


def list_query_sets(session: Session, tenant: Tenant, page: Page) -> tuple[list[QuerySet], int]:
    """A page of the tenant's query sets, newest first, and their total."""
    mine = (QuerySet.tenant_id == tenant.id, on_live_corpus(QuerySet.corpus_id),
            QuerySet.deleted_at.is_(None))
    return newest_first(session, QuerySet, page, *mine)


def delete_query_set(session: Session, tenant: Tenant, query_set_id: str) -> QuerySet:
    """Delete a query set no unfinished job uses (409 naming them otherwise); the caller removes
    its files after the commit. Finished jobs keep naming it."""
    row = get_query_set(session, tenant, query_set_id)
    refuse_if_used("query_set", row.id, active_jobs_using(session, tenant.id, query_set_id=row.id))
    row.deleted_at = utcnow()
    session.flush()
    return row


def query_set_prefix(query_set_id: str) -> str:
    """Object-store folder of a query set's files."""
    return f"query_sets/{query_set_id}/"
