"""Evaluation: nDCG@10 / Recall@100 / MRR@10 of a retriever, the teacher check, and the report.

Metrics come from pytrec_eval (trec_eval's own code). Passages that are chunks of one document
are scored by their best chunk (max pooling), because judgements are made on documents.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ml_core.candidates import Encoder, Scorer, passage_text
from ml_core.config import EvaluationConfig
from ml_core.records import Passage, ProgressFn, Query, no_progress
from ml_core.retrieval import DenseIndex

Qrels = Mapping[str, Mapping[str, int]]
Rankings = Mapping[str, Sequence[str]]

PRIMARY = "ndcg@10"
MRR_DEPTH = 10
ENCODE_BATCH_SIZE = 64
# The teacher must beat the student by this much (in the check's metric) to count as better:
# more than a check on a sample of the queries moves by chance.
TEACHER_MARGIN = 0.02
# Under this many evaluation queries a gain is reported with a noise warning.
FEW_QUERIES = 30
# Below this many dev queries the dev loss that picks the best epoch is mostly noise.
FEW_DEV_QUERIES = 30
# Paired comparisons (tuned vs base on the same queries): bootstrap and sign-flip resamples,
# and their fixed seed, so a report is a function of its rankings.
RESAMPLES = 10_000
RESAMPLE_SEED = 0


def ranking_from_scores(
    ids: Sequence[str],
    scores: Sequence[float] | np.ndarray,
    k: int | None = None,
    document_of: Mapping[str, str] | None = None,
) -> list[tuple[str, float]]:
    """[(id, score)] best first, cut to k; with `document_of`, chunk scores are max-pooled to
    their documents first (a document's score is its best chunk's). Ties keep input order."""
    order = sorted(range(len(ids)), key=lambda i: -float(scores[i]))
    ranking: list[tuple[str, float]] = []
    seen: set[str] = set()
    for i in order:
        key = document_of.get(ids[i], ids[i]) if document_of else ids[i]
        if key in seen:
            continue  # a later (lower-scored) chunk of a document already ranked
        seen.add(key)
        ranking.append((key, float(scores[i])))
        if k is not None and len(ranking) >= k:
            break
    return ranking


def pool_to_documents(ranking: Sequence[str], document_of: Mapping[str, str]) -> list[str]:
    """A best-first passage ranking as a best-first document ranking (each document at the rank
    of its best chunk, i.e. max pooling)."""
    return list(dict.fromkeys(document_of.get(pid, pid) for pid in ranking))


def _run(rankings: Rankings, depth: int | None = None) -> dict[str, dict[str, float]]:
    # pytrec_eval re-sorts by score (ties by doc id); rank-derived scores keep our order exactly.
    run = {}
    for qid, ranking in rankings.items():
        ranked = list(ranking)[:depth] if depth else list(ranking)
        run[qid] = {doc: float(len(ranked) - i) for i, doc in enumerate(ranked)}
    return run


def per_query_metrics(
    rankings: Rankings, qrels: Qrels, k_values: Sequence[int] = (10, 100)
) -> dict[str, dict[str, float]]:
    """{query id: {"ndcg@k", "recall@k" for each k, "mrr@10"}} for every query in `rankings`
    with at least one relevant judgement; a query with an empty ranking scores 0."""
    import pytrec_eval

    judged = {
        qid: {doc: int(rel) for doc, rel in qrels[qid].items()}
        for qid in rankings
        if qid in qrels and any(rel > 0 for rel in qrels[qid].values())
    }
    if not judged:
        return {}
    measures = {f"ndcg_cut.{k}" for k in k_values} | {f"recall.{k}" for k in k_values}
    main = pytrec_eval.RelevanceEvaluator(judged, measures).evaluate(
        _run({q: rankings[q] for q in judged})
    )
    # MRR@10: trec_eval's recip_rank has no cut-off, so it runs on lists cut at 10.
    mrr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(
        _run({q: rankings[q] for q in judged}, depth=MRR_DEPTH)
    )
    result: dict[str, dict[str, float]] = {}
    for qid in judged:
        row = main.get(qid, {})
        metrics = {f"ndcg@{k}": float(row.get(f"ndcg_cut_{k}", 0.0)) for k in k_values}
        metrics |= {f"recall@{k}": float(row.get(f"recall_{k}", 0.0)) for k in k_values}
        metrics[f"mrr@{MRR_DEPTH}"] = float(mrr.get(qid, {}).get("recip_rank", 0.0))
        result[qid] = metrics
    return result


def _mean(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    if not rows:
        return {}
    return {name: float(np.mean([row[name] for row in rows])) for name in rows[0]}


def metrics_from_rankings(
    rankings: Rankings,
    qrels: Qrels,
    k_values: Sequence[int] = (10, 100),
    query_types: Mapping[str, str] | None = None,
    keep_per_query: bool = False,
) -> dict[str, Any]:
    """Mean metrics of document rankings: {"ndcg@k", "recall@k", "mrr@10", "queries"} plus
    "per_query_type" {type: {metrics, "queries"}} when `query_types` names any type, and
    "per_query" {query id: nDCG@10} when `keep_per_query` (for paired comparisons)."""
    per_query = per_query_metrics(rankings, qrels, k_values)
    result: dict[str, Any] = {**_mean(list(per_query.values())), "queries": len(per_query)}
    if keep_per_query:
        result["per_query"] = {qid: row[PRIMARY] for qid, row in per_query.items()}
    if not per_query:
        result |= {f"ndcg@{k}": 0.0 for k in k_values} | {f"recall@{k}": 0.0 for k in k_values}
        result[f"mrr@{MRR_DEPTH}"] = 0.0
    if query_types and any(query_types.get(qid) for qid in per_query):
        groups: dict[str, list[Mapping[str, float]]] = {}
        for qid, row in per_query.items():
            groups.setdefault(query_types.get(qid) or "unknown", []).append(row)
        result["per_query_type"] = {
            name: {**_mean(rows), "queries": len(rows)} for name, rows in sorted(groups.items())
        }
    return result


def dense_rankings(
    student: Encoder,
    passages: Sequence[Passage],
    queries: Sequence[Query],
    depth: int,
    passage_vectors: np.ndarray | None = None,
    batch_size: int = ENCODE_BATCH_SIZE,
) -> dict[str, list[str]]:
    """{query id: passage ids} from exact dense search, `depth` passages (chunks) per query."""
    if passage_vectors is None:
        passage_vectors = student.encode_passages(list(passages), batch_size=batch_size)
    index = DenseIndex.build(passage_vectors, [p.id for p in passages])
    query_vectors = student.encode_queries([q.text for q in queries], batch_size=batch_size)
    _, ids = index.search(query_vectors, depth)
    return {q.id: row for q, row in zip(queries, ids, strict=True)}


def _chunk_depth(passages: Sequence[Passage], documents: int) -> int:
    # Retrieving documents x (most chunks of any document) passages is enough for the exact
    # max-pooled top `documents`: every chunk scoring above the k-th document's best chunk
    # belongs to one of the top k documents.
    per_doc: dict[str, int] = {}
    for p in passages:
        per_doc[p.document_id] = per_doc.get(p.document_id, 0) + 1
    return min(len(passages), documents * max(per_doc.values(), default=1))


def evaluate_retriever(
    student: Encoder,
    passages: Sequence[Passage],
    queries: Sequence[Query],
    qrels: Qrels,
    k_values: Sequence[int] = (10, 100),
    passage_vectors: np.ndarray | None = None,
    batch_size: int = ENCODE_BATCH_SIZE,
) -> dict[str, Any]:
    """The student's retrieval quality on judged queries (exact search over all passages).

    Returns {"ndcg@k", "recall@k" for k in k_values, "mrr@10", "queries", "per_query"
    (nDCG@10 by query id)} and, when queries carry query types, "per_query_type". Qrels name
    documents; chunk scores are max-pooled to them.
    """
    rankings = first_stage_documents(
        student, passages, queries, max(k_values), passage_vectors, batch_size
    )
    types = {q.id: q.query_type for q in queries}
    return metrics_from_rankings(rankings, qrels, k_values, types, keep_per_query=True)


def first_stage_documents(
    student: Encoder,
    passages: Sequence[Passage],
    queries: Sequence[Query],
    documents: int,
    passage_vectors: np.ndarray | None = None,
    batch_size: int = ENCODE_BATCH_SIZE,
) -> dict[str, list[str]]:
    """{query id: the top `documents` document ids} by the student, chunks max-pooled."""
    document_of = {p.id: p.document_id for p in passages}
    chunk_rankings = dense_rankings(
        student, passages, queries, _chunk_depth(passages, documents), passage_vectors, batch_size
    )
    return {
        qid: pool_to_documents(ranking, document_of)[:documents]
        for qid, ranking in chunk_rankings.items()
    }


def rerank_metrics(
    teacher: Scorer,
    queries: Sequence[Query],
    passages: Sequence[Passage] | Mapping[str, Passage],
    first_stage: Rankings,
    qrels: Qrels,
    depth: int = 20,
    k_values: Sequence[int] = (10, 100),
    batch_size: int = 32,
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Metrics after the teacher re-scores the top `depth` passages of a first-stage ranking.

    `first_stage` holds passage (chunk) ids, best first. The re-ranked head is followed by the
    untouched tail, so Recall@100 stays comparable; then chunks are max-pooled to documents.
    Returns the same fields as metrics_from_rankings.
    """
    by_id = passages if isinstance(passages, Mapping) else {p.id: p for p in passages}
    text_of = {q.id: q.text for q in queries}
    pairs: list[tuple[str, str]] = []
    for q in queries:
        pairs.extend((q.text, passage_text(by_id[pid])) for pid in list(first_stage[q.id])[:depth])
    scores = (
        np.asarray(teacher.score(pairs, batch_size=batch_size, progress=progress), dtype=float)
        if pairs
        else np.zeros(0)
    )
    document_of = {pid: p.document_id for pid, p in by_id.items()}
    rankings: dict[str, list[str]] = {}
    offset = 0
    for qid in text_of:
        ranking = list(first_stage[qid])
        head = ranking[:depth]
        head_scores = scores[offset:offset + len(head)]
        offset += len(head)
        reranked = [pid for pid, _ in ranking_from_scores(head, head_scores)]
        rankings[qid] = pool_to_documents(reranked + ranking[depth:], document_of)
    types = {q.id: q.query_type for q in queries}
    return metrics_from_rankings(rankings, qrels, k_values, types)


def teacher_check(
    student: Encoder,
    teacher: Scorer,
    passages: Sequence[Passage],
    queries: Sequence[Query],
    qrels: Qrels,
    passage_vectors: np.ndarray | None = None,
    depth: int = 20,
    max_queries: int = 100,
    seed: int = 0,
    batch_size: int = 32,
    progress: ProgressFn = no_progress,
) -> dict[str, Any]:
    """Is the teacher better than the student here? nDCG@10 of the student vs the teacher
    re-ranking the student's top `depth`, on (a seeded sample of at most `max_queries` of) the
    judged queries. Returns {"method": "judged_rerank", "metric": "ndcg@10", "queries", "depth",
    "teacher", "student", "teacher_metrics", "student_metrics"}.

    The recipe's teacher is its ceiling (Tamber et al. 2025): where the cross-encoder ranks no
    better than the student (on Cranfield, for one; docs/models.md) distillation gains are capped.
    """
    judged = [q for q in queries if q.id in qrels]
    if len(judged) > max_queries:
        judged = random.Random(seed).sample(sorted(judged, key=lambda q: q.id), max_queries)
    chunk_depth = _chunk_depth(passages, 100)
    first_stage = dense_rankings(student, passages, judged, max(depth, chunk_depth),
                                 passage_vectors)
    document_of = {p.id: p.document_id for p in passages}
    student_docs = {qid: pool_to_documents(r, document_of) for qid, r in first_stage.items()}
    types = {q.id: q.query_type for q in judged}
    student_metrics = metrics_from_rankings(student_docs, qrels, (10, 100), types)
    teacher_metrics = rerank_metrics(teacher, judged, passages, first_stage, qrels, depth,
                                     batch_size=batch_size, progress=progress)
    return {
        "method": "judged_rerank",
        "metric": PRIMARY,
        "queries": student_metrics["queries"],
        "depth": depth,
        "teacher": teacher_metrics[PRIMARY],
        "student": student_metrics[PRIMARY],
        "teacher_metrics": teacher_metrics,
        "student_metrics": student_metrics,
    }


def paired_difference(
    base: Mapping[str, float],
    tuned: Mapping[str, float],
    resamples: int = RESAMPLES,
    seed: int = RESAMPLE_SEED,
) -> dict[str, Any]:
    """How sure is a difference between two systems scored on the same queries?

    `base` and `tuned` map query id -> score (e.g. nDCG@10); only queries in both count.
    Returns {"queries", "difference" (mean of tuned - base), "ci95" [low, high] (percentile
    bootstrap over queries), "p_value" (two-sided paired randomization test: each query's
    difference keeps or flips its sign), "better", "worse", "same" (query counts)}. With no
    shared queries the difference is 0 with an interval [0, 0] and p 1.
    """
    shared = sorted(set(base) & set(tuned))
    diff = np.array([float(tuned[q]) - float(base[q]) for q in shared], dtype=np.float64)
    counts = {
        "better": int((diff > 1e-12).sum()),
        "worse": int((diff < -1e-12).sum()),
        "same": int((np.abs(diff) <= 1e-12).sum()),
    }
    if not len(diff):
        return {"queries": 0, "difference": 0.0, "ci95": [0.0, 0.0], "p_value": 1.0, **counts}
    rng = np.random.default_rng(seed)
    observed = float(diff.mean())
    # Chunks of resamples keep memory at ~chunk x queries whatever the query count.
    boot, flipped, chunk = [], [], max(1, 4_000_000 // len(diff))
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        boot.append(diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(axis=1))
        signs = rng.integers(0, 2, size=(n, len(diff))) * 2 - 1
        flipped.append((signs * diff).mean(axis=1))
    low, high = np.percentile(np.concatenate(boot), [2.5, 97.5])
    extreme = int((np.abs(np.concatenate(flipped)) >= abs(observed) - 1e-12).sum())
    return {
        "queries": len(diff),
        "difference": observed,
        "ci95": [float(low), float(high)],
        "p_value": (extreme + 1) / (resamples + 1),
        **counts,
    }


def _numeric_gain(base: Mapping[str, Any], tuned: Mapping[str, Any]) -> dict[str, float]:
    numeric = (int, float)
    return {
        name: float(tuned[name]) - float(value)
        for name, value in base.items()
        if name != "queries" and isinstance(value, numeric) and isinstance(tuned.get(name), numeric)
    }


def teacher_is_better(teacher_check_result: Mapping[str, Any] | None) -> bool | None:
    """True/False when the check shows whether the teacher beats the student by TEACHER_MARGIN;
    None when there is no usable check."""
    if not teacher_check_result or not teacher_check_result.get("queries"):
        return None
    teacher = teacher_check_result.get("teacher")
    student = teacher_check_result.get("student")
    if teacher is None or student is None:
        return None
    return float(teacher) > float(student) + TEACHER_MARGIN


def build_report(
    base: Mapping[str, Any],
    tuned: Mapping[str, Any],
    teacher_check: Mapping[str, Any] | None,
    cfg: EvaluationConfig,
    judgements: str,
    base_kept: bool = False,
    dev_queries: int | None = None,
) -> dict[str, Any]:
    """The evaluate stage's report.json body (docs/architecture.md, "Contract: the evaluation
    report").

    Returns {"base", "tuned", "gain", "recommended", "warnings", "per_query_type",
    "teacher_check", "judgements", "base_kept"} and, when both carry "per_query" scores,
    "significance" (paired_difference of nDCG@10: interval and p-value of the gain) and
    "per_query" {query id: {"base", "tuned"}}. "tuned" is recommended only when its nDCG@10 gain
    exceeds cfg.min_gain; the customer is never silently left with a worse model, and a gain
    whose interval includes 0 is reported as within noise. `base_kept`: training never beat the
    base on its dev loss, so "tuned" holds the base's own weights; the report says so instead
    of comparing the two, and recommends the base; `dev_queries` (the dev split's size, when
    known) lets it say when that dev loss was too small a sample to select on.
    """
    detail = ("per_query_type", "per_query")
    base_summary = {k: v for k, v in base.items() if k not in detail}
    tuned_summary = {k: v for k, v in tuned.items() if k not in detail}
    gain = _numeric_gain(base_summary, tuned_summary)
    primary_gain = gain.get(PRIMARY, 0.0)
    recommended = "tuned" if primary_gain > cfg.min_gain and not base_kept else "base"
    warnings: list[str] = []
    if base_kept:
        # The pipeline passes the base's own rows twice; a caller that encoded the same weights
        # a second time may see numerics, which the report names as such.
        warnings.append(
            "training never beat the base model on the synthetic dev loss, so the tuned model "
            "is the base model: base is recommended"
            + ("" if base == tuned else
               ", and any difference between the two rows is encoding numerics")
        )
        if dev_queries is not None and dev_queries < FEW_DEV_QUERIES:
            warnings.append(
                f"the dev loss that kept the base was measured on only {dev_queries} dev "
                f"queries, too few to tell a better model from noise: give the job more "
                f"queries (a larger generation.passages or a larger query set) or a larger "
                f"training.dev_fraction"
            )
    elif primary_gain < 0 and recommended == "base":
        warnings.append("tuned model is worse than base: keeping base as recommendation")
    elif primary_gain < 0:
        warnings.append(
            f"tuned model is worse than base ({primary_gain:+.4f} nDCG@10) but recommended: "
            f"evaluation.min_gain ({cfg.min_gain:+.4f}) allows a loss"
        )
    elif recommended == "base":
        warnings.append(
            f"tuned model's nDCG@10 gain ({primary_gain:+.4f}) does not exceed the required "
            f"minimum ({cfg.min_gain:+.4f}): keeping base as recommendation"
        )
    if teacher_is_better(teacher_check) is False:
        warnings.append("teacher is no better than the student on this corpus: gains are capped")
    n_queries = int(base.get("queries", 0) or 0)
    if n_queries < FEW_QUERIES:
        warnings.append(
            f"only {n_queries} evaluation queries: the measured difference is noisy"
        )
    significance = None
    per_query = None
    if base.get("per_query") is not None and tuned.get("per_query") is not None:
        significance = {"metric": PRIMARY,
                        **paired_difference(base["per_query"], tuned["per_query"])}
        low, high = significance["ci95"]
        if low <= 0.0 <= high and primary_gain != 0 and not base_kept:
            warnings.append(
                f"the nDCG@10 difference ({primary_gain:+.4f}) is within noise: its 95% "
                f"interval [{low:+.4f}, {high:+.4f}] over {significance['queries']} queries "
                "includes 0"
            )
        per_query = {
            qid: {"base": base["per_query"][qid], "tuned": tuned["per_query"][qid]}
            for qid in sorted(set(base["per_query"]) & set(tuned["per_query"]))
        }
    if judgements == "synthetic":
        warnings.append(
            "no customer judgements: scores are on held-out synthetic queries, which favour "
            "models trained on the same kind of queries"
        )

    per_type: dict[str, Any] = {}
    base_types = base.get("per_query_type") or {}
    tuned_types = tuned.get("per_query_type") or {}
    for name in sorted(set(base_types) & set(tuned_types)):
        type_gain = _numeric_gain(base_types[name], tuned_types[name])
        per_type[name] = {"base": base_types[name], "tuned": tuned_types[name], "gain": type_gain}
    worse = [name for name, row in per_type.items() if row["gain"].get(PRIMARY, 0.0) < 0]
    if worse and recommended == "tuned":
        warnings.append(f"tuned model is worse than base on query types: {', '.join(worse)}")

    check = dict(teacher_check) if teacher_check else None
    if check and judgements == "synthetic" and check.get("method") == "judged_rerank":
        # Synthetic test queries survived the round-trip filter, i.e. the teacher already put
        # their source first: a rerank check on them cannot show a weak teacher.
        check["caveat"] = (
            "measured on queries the teacher's round-trip filter kept; the filter stage's "
            "teacher_check (before filtering) is the unbiased comparison"
        )
    report: dict[str, Any] = {
        "base": base_summary,
        "tuned": tuned_summary,
        "gain": gain,
        "recommended": recommended,
        "warnings": warnings,
        "per_query_type": per_type,
        "teacher_check": check,
        "judgements": judgements,
        "base_kept": base_kept,
    }
    if significance is not None:
        report["significance"] = significance
        report["per_query"] = per_query
    return report
