"""Retrieval set-ups on the evaluation's judgements: which way of searching the corpus is best.

The evaluation report compares the base and tuned models as the job indexes the corpus (chunks,
each document scored by its best chunk). A customer also chooses how to search: BM25 alone,
reciprocal rank fusion of BM25 with a dense model (hybrid search), and whether to chunk at all
or encode each document whole (cut at the model's length, as `POST /v1/embed` on a whole
document does). `compare_setups` scores each of these on the same judged queries, pairs each
with the reference (the tuned model on chunks) and names the best.

Nothing here is fitted to the judgements: RRF's k is the published constant (RRF_K) and fusion
takes a fixed depth from each ranking, so the rows stay honest test figures. The best row is
the highest on these judgements, reported with its interval against the reference, so a best
that is within noise of it says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml_core.candidates import Encoder
from ml_core.evaluation import (
    ENCODE_BATCH_SIZE,
    PRIMARY,
    _chunk_depth,
    metrics_from_rankings,
    paired_difference,
    pool_to_documents,
)
from ml_core.records import Passage, Query
from ml_core.retrieval import BM25Index, DenseIndex, reciprocal_rank_fusion

# The report section's layout; a page or client reading another version shows what it knows.
VERSION = 1
# Cormack, Clarke and Buettcher 2009's constant: fixed, never selected on the judgements.
RRF_K = 60
# Documents taken from each ranking before fusion, and kept after it (Recall@100's depth).
DEPTH = 100
Qrels = Mapping[str, Mapping[str, int]]


@dataclass(frozen=True)
class DenseModel:
    """A dense model as the comparison needs it: `passage_vectors` are its vectors of the
    job's passages (chunks), in order; `whole_tokens` is where it cuts a whole document."""

    name: str
    encoder: Encoder
    passage_vectors: np.ndarray
    whole_tokens: int


def whole_document_vectors(
    encoder: Encoder,
    passages: Sequence[Passage],
    documents: Sequence[Passage],
    passage_vectors: np.ndarray,
    batch_size: int = ENCODE_BATCH_SIZE,
) -> tuple[np.ndarray, int]:
    """(one vector per document, how many documents were encoded).

    A document that was not chunked is its own passage, so its passage vector is reused; only
    chunked documents are encoded again, whole, cut at the model's length by its tokenizer.
    """
    row_of = {p.id: i for i, p in enumerate(passages) if not p.parent_id}
    missing = [d for d in documents if d.id not in row_of]
    fresh: dict[str, np.ndarray] = {}
    if missing:
        encoded = np.asarray(encoder.encode_passages(missing, batch_size=batch_size),
                             dtype=np.float32)
        fresh = {d.id: encoded[i] for i, d in enumerate(missing)}
    vectors = np.stack([fresh[d.id] if d.id in fresh else passage_vectors[row_of[d.id]]
                        for d in documents]).astype(np.float32, copy=False)
    return vectors, len(missing)


def _dense_documents(
    query_vectors: np.ndarray, vectors: np.ndarray, ids: Sequence[str], queries: Sequence[Query],
    k: int, document_of: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """{query id: top `depth` document ids} of exact dense search over `vectors` (chunks
    max-pooled to documents when `document_of` is given, searched `k` deep)."""
    _, rows = DenseIndex.build(vectors, list(ids)).search(query_vectors, k)
    if document_of is None:
        return {q.id: row[:DEPTH] for q, row in zip(queries, rows, strict=True)}
    return {q.id: pool_to_documents(row, document_of)[:DEPTH]
            for q, row in zip(queries, rows, strict=True)}


def fuse_rankings(first: Mapping[str, Sequence[str]], second: Mapping[str, Sequence[str]],
                  k: int = RRF_K) -> dict[str, list[str]]:
    """{query id: the hybrid's top DEPTH}: RRF of each query's two rankings, each taken
    DEPTH deep (the report's hybrid rows; bench.teacher_signal's hybrid column)."""
    return {qid: reciprocal_rank_fusion([list(first[qid])[:DEPTH],
                                         list(second.get(qid, []))[:DEPTH]], k)[:DEPTH]
            for qid in first}


def setup_name(model: str | None, indexing: str, chunk_tokens: int, whole_tokens: int | None,
               fused: bool, rrf_k: int = RRF_K) -> str:
    """How a set-up is said to people, with every parameter a customer needs to repeat it, e.g.
    "hybrid: tuned + BM25, RRF k=60, chunks of 128 tokens, max over chunks"."""
    if model is None:
        return "BM25 on whole documents"
    where = (f"chunks of {chunk_tokens} tokens, max over chunks" if indexing == "chunks"
             else f"whole documents cut at {whole_tokens} tokens")
    return f"hybrid: {model} + BM25, RRF k={rrf_k}, {where}" if fused else f"{model}, {where}"


def compare_setups(
    models: Sequence[DenseModel],
    passages: Sequence[Passage],
    documents: Sequence[Passage],
    queries: Sequence[Query],
    qrels: Qrels,
    chunk_tokens: int,
    chunk_overlap_tokens: int,
    rrf_k: int = RRF_K,
    batch_size: int = ENCODE_BATCH_SIZE,
    per_query: dict[str, dict[str, float]] | None = None,
    whole_documents: bool = True,
) -> dict[str, Any]:
    """The report's "retrievers" section: one row per set-up (BM25 on documents; each model on
    chunks, and also on whole documents when any document was chunked; each of those fused with
    BM25), each with nDCG@10, Recall@100, MRR@10 and its paired difference
    against the reference (the last model on chunks: the tuned model, or the base when training
    kept it); "chunking" (chunks minus whole, paired, per model); "whole_gain" (the reference
    minus the first model, both on whole documents, paired; None without them); "best" (the
    highest nDCG@10; ties go to the reference, then to the earlier row; "ties": the rows whose
    paired interval against it reaches 0, i.e. as good within noise).

    `passages` are the job's chunks with each model's vectors of them in `models`; `documents`
    the corpus documents those chunks come from, whole (ids are document ids). `per_query`, when
    given, is filled with {row id: {query id: nDCG@10}}, for pairing rows across jobs. With
    `whole_documents` False no model encodes documents whole: no whole rows, "chunking" is
    empty and "whole_gain" None, as when no document was chunked.
    """
    if not models:
        raise ValueError("compare_setups needs at least one dense model")
    document_of = {p.id: p.document_id for p in passages}
    texts = [q.text for q in queries]
    bm25 = BM25Index(documents)
    _, bm25_ids = bm25.search(texts, DEPTH)
    rankings: dict[str, dict[str, list[str]]] = {
        "bm25": {q.id: ids for q, ids in zip(queries, bm25_ids, strict=True)}}
    specs: dict[str, dict[str, Any]] = {"bm25": {"retriever": "bm25", "model": None,
                                                "indexing": "whole", "whole_tokens": None}}
    encoded_documents = 0
    chunked = {p.parent_id for p in passages if p.parent_id}
    doc_ids = [d.id for d in documents]
    chunk_k = _chunk_depth(passages, DEPTH)
    for model in models:
        query_vectors = model.encoder.encode_queries(texts, batch_size=batch_size)
        dense = {"chunks": _dense_documents(
            query_vectors, model.passage_vectors, [p.id for p in passages], queries, chunk_k,
            document_of)}
        # Whole documents cost an encoding of every chunked document; every model pays it, so
        # that tuning is also paired on the index a customer calling /v1/embed on whole
        # documents builds (a model may lose on chunks what it keeps whole, or the reverse).
        if chunked and whole_documents:
            vectors, encoded = whole_document_vectors(
                model.encoder, passages, documents, model.passage_vectors, batch_size)
            encoded_documents += encoded
            dense = {"whole": _dense_documents(query_vectors, vectors, doc_ids, queries, DEPTH),
                     **dense}
        # Rows in reading order: the model whole, on chunks, then each fused with BM25.
        for fused in (False, True):
            for indexing, ranking in dense.items():
                rid = f"{model.name}{'+bm25' if fused else ''}-{indexing}"
                rankings[rid] = (fuse_rankings(ranking, rankings["bm25"], rrf_k) if fused
                                 else ranking)
                specs[rid] = {"retriever": "hybrid" if fused else "dense", "model": model.name,
                              "indexing": indexing, "whole_tokens": model.whole_tokens}

    reference = f"{models[-1].name}-chunks"
    scored = {rid: metrics_from_rankings(r, qrels, keep_per_query=True)
              for rid, r in rankings.items()}
    reference_scores = scored[reference]["per_query"]
    if per_query is not None:
        per_query.update({rid: dict(metrics["per_query"]) for rid, metrics in scored.items()})
    rows: list[dict[str, Any]] = []
    for rid, metrics in scored.items():
        spec = specs[rid]
        short = "BM25" if spec["model"] is None else (
            f"{spec['model']}{' + BM25' if spec['retriever'] == 'hybrid' else ''}, "
            f"{spec['indexing']}")
        row = {"id": rid,
               "label": short,
               "setup": setup_name(spec["model"], spec["indexing"], chunk_tokens,
                                   spec["whole_tokens"], spec["retriever"] == "hybrid", rrf_k),
               **spec,
               **{k: v for k, v in metrics.items() if k != "per_query"}}
        if rid != reference:
            row["vs_reference"] = paired_difference(reference_scores, metrics["per_query"])
        rows.append(row)
    order = {row["id"]: i for i, row in enumerate(rows)}
    best_row = max(rows, key=lambda r: (r[PRIMARY], r["id"] == reference, -order[r["id"]]))
    best: dict[str, Any] = {"id": best_row["id"], "setup": best_row["setup"],
                            PRIMARY: best_row[PRIMARY], "reference": best_row["id"] == reference}
    # Rows the best does not beat beyond noise (paired against the best itself): a customer may
    # pick the simplest of them.
    best_scores = scored[best_row["id"]]["per_query"]
    best["ties"] = [
        row["id"] for row in rows if row["id"] != best_row["id"]
        and paired_difference(best_scores, scored[row["id"]]["per_query"])["ci95"][1] >= 0.0
    ]
    if best_row["id"] != reference:
        versus = best_row["vs_reference"]
        low, high = versus["ci95"]
        best |= {"difference": versus["difference"], "ci95": versus["ci95"],
                 "p_value": versus["p_value"], "within_noise": bool(low <= 0.0 <= high)}
    chunking = {
        model.name: paired_difference(scored[f"{model.name}-whole"]["per_query"],
                                      scored[f"{model.name}-chunks"]["per_query"])
        for model in models if f"{model.name}-whole" in scored
    }
    # What tuning buys on whole documents: the reference against the first model (the base),
    # paired, beside the chunked figure the report leads with.
    whole_gain = None
    first, last = models[0].name, models[-1].name
    if first != last and f"{first}-whole" in scored and f"{last}-whole" in scored:
        whole_gain = {"models": [first, last], **paired_difference(
            scored[f"{first}-whole"]["per_query"], scored[f"{last}-whole"]["per_query"])}
    return {
        "version": VERSION,
        "metric": PRIMARY,
        "reference": reference,
        "fusion": {"method": "rrf", "k": rrf_k, "depth": DEPTH},
        "chunk_tokens": chunk_tokens,
        "chunk_overlap_tokens": chunk_overlap_tokens,
        "documents": len(documents),
        "chunked_documents": len(chunked),
        "whole_documents": whole_documents,
        "encoded_documents": encoded_documents,
        "queries": scored[reference]["queries"],
        "rows": rows,
        "chunking": chunking,
        "whole_gain": whole_gain,
        "best": best,
    }


def corpus_documents(path: Any, passages: Sequence[Passage]) -> list[Passage]:
    """The corpus's documents that the job's passages come from, whole, in corpus order (those
    hygiene dropped are left out, as the passages leave them out)."""
    from ml_core.corpus import iter_corpus

    wanted = {p.document_id for p in passages}
    seen: set[str] = set()
    documents = []
    for document in iter_corpus(path):
        if document.id in wanted and document.id not in seen:
            seen.add(document.id)
            documents.append(document)
    return documents
