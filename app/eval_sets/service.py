"""Eval set rules: judgements must name known queries and documents of the corpus."""

from __future__ import annotations

import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from app.corpora.service import get_corpus, on_live_corpus
from app.db.base import utcnow
from app.db.models import Corpus, EvalSet, Tenant
from app.db.tenant_rows import newest_first, owned
from app.dependants import active_jobs_using, refuse_if_used
from app.deps import Page
from app.errors import InvalidEvalSet
from app.ids import new_id
from app.storage import ObjectStore, stored_until_committed
from app.uploads import SpooledFile
from ml_core.corpus import CorpusError, iter_corpus, read_qrels, read_queries

# How many offending ids an error message lists.
SHOWN_IDS = 5


def _invalid(exc: CorpusError, field: str, filename: str) -> InvalidEvalSet:
    return InvalidEvalSet(f"{filename}: {exc.message}", file=field, line=exc.line, field=exc.field)


def _missing_documents(store: ObjectStore, corpus: Corpus, doc_ids: set[str]) -> set[str]:
    """The subset of `doc_ids` absent from the stored corpus (streamed, never held whole)."""
    missing = set(doc_ids)
    suffix = ".gz" if corpus.object_key.endswith(".gz") else ""
    with tempfile.TemporaryDirectory(prefix="tailor-evalset-") as tmp:
        local = store.get_file(corpus.object_key, Path(tmp) / f"corpus.jsonl{suffix}")
        for passage in iter_corpus(local):
            missing.discard(passage.id)
            if not missing:
                break
    return missing


def create_eval_set(
    session: Session,
    store: ObjectStore,
    tenant: Tenant,
    corpus_id: str,
    name: str,
    queries_file: SpooledFile,
    qrels_file: SpooledFile,
) -> EvalSet:
    """Validate queries and qrels against each other and the corpus, store them, record the set."""
    corpus = get_corpus(session, tenant, corpus_id)
    try:
        query_ids = {query.id for query in read_queries(queries_file.path)}
    except CorpusError as exc:
        raise _invalid(exc, "queries", queries_file.filename) from exc
    try:
        qrels = read_qrels(qrels_file.path)
    except CorpusError as exc:
        raise _invalid(exc, "qrels", qrels_file.filename) from exc
    if not qrels:
        raise InvalidEvalSet(f"{qrels_file.filename}: no judgements", file="qrels")
    unknown_queries = sorted(set(qrels) - query_ids)
    if unknown_queries:
        raise InvalidEvalSet(
            f"{qrels_file.filename}: {len(unknown_queries)} query ids are not in "
            f"{queries_file.filename}, e.g. {', '.join(unknown_queries[:SHOWN_IDS])}",
            file="qrels",
            field="query-id",
            ids=unknown_queries[:SHOWN_IDS],
        )
    doc_ids = {doc_id for judged in qrels.values() for doc_id in judged}
    unknown_docs = sorted(_missing_documents(store, corpus, doc_ids))
    if unknown_docs:
        raise InvalidEvalSet(
            f"{qrels_file.filename}: {len(unknown_docs)} document ids are not in corpus "
            f"{corpus.id}, e.g. {', '.join(unknown_docs[:SHOWN_IDS])}",
            file="qrels",
            field="corpus-id",
            ids=unknown_docs[:SHOWN_IDS],
        )
    eval_set_id = new_id("evs")
    queries_key = f"eval_sets/{eval_set_id}/queries.jsonl"
    qrels_key = f"eval_sets/{eval_set_id}/qrels.tsv"
    eval_set = EvalSet(
        id=eval_set_id,
        tenant_id=tenant.id,
        corpus_id=corpus.id,
        name=name or queries_file.default_name,
        queries_key=queries_key,
        qrels_key=qrels_key,
        queries=len(qrels),
        judgements=sum(len(judged) for judged in qrels.values()),
        size_bytes=queries_file.size + qrels_file.size,
    )
    # Committed here, so a row that cannot be written leaves no stored files behind.
    with stored_until_committed(session, store, f"eval_sets/{eval_set_id}/"):
        store.put_file(queries_key, queries_file.path)
        store.put_file(qrels_key, qrels_file.path)
        session.add(eval_set)
    return eval_set


def get_eval_set(session: Session, tenant: Tenant, eval_set_id: str) -> EvalSet:
    """The tenant's eval set `eval_set_id` (404 otherwise)."""
    live = on_live_corpus(EvalSet.corpus_id)
    return owned(session, EvalSet, tenant.id, eval_set_id, "eval_set", live,
                 EvalSet.deleted_at.is_(None))


def list_eval_sets(session: Session, tenant: Tenant, page: Page) -> tuple[list[EvalSet], int]:
    """A page of the tenant's eval sets, newest first, and their total."""
    mine = (EvalSet.tenant_id == tenant.id, on_live_corpus(EvalSet.corpus_id),
            EvalSet.deleted_at.is_(None))
    return newest_first(session, EvalSet, page, *mine)


def delete_eval_set(session: Session, tenant: Tenant, eval_set_id: str) -> EvalSet:
    """Delete a eval set no unfinished job uses (409 naming them otherwise); the caller removes
    its files after the commit. Finished jobs keep naming it."""
    row = get_eval_set(session, tenant, eval_set_id)
    refuse_if_used("eval_set", row.id, active_jobs_using(session, tenant.id, eval_set_id=row.id))
    row.deleted_at = utcnow()
    session.flush()
    return row


def eval_set_prefix(eval_set_id: str) -> str:
    """Object-store folder of a eval set's files."""
    return f"eval_sets/{eval_set_id}/"
