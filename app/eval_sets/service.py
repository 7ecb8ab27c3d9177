"""Eval set rules: judgements must name known queries and documents of the corpus."""

from __future__ import annotations

import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from app.corpora.service import get_corpus
from app.corpus_sets import EVAL_SETS
from app.db.models import Corpus, EvalSet, Tenant
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


get_eval_set = EVAL_SETS.get
list_eval_sets = EVAL_SETS.list
delete_eval_set = EVAL_SETS.delete
eval_set_prefix = EVAL_SETS.prefix
