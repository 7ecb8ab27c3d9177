"""Query set rules: a readable BEIR queries file for one of the tenant's corpora."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.corpora.service import get_corpus
from app.corpus_sets import QUERY_SETS
from app.db.models import QuerySet, Tenant
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


get_query_set = QUERY_SETS.get
list_query_sets = QUERY_SETS.list
delete_query_set = QUERY_SETS.delete
query_set_prefix = QUERY_SETS.prefix
