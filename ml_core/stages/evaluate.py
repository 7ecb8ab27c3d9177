"""Evaluate: the tuned model + test queries -> report.json (base vs tuned nDCG@10, BM25, hybrid
and whole-document retrieval beside them (ml_core.setups), the teacher check, and whether to use
the tuned model), and setup_scores.json (each set-up row's nDCG@10 per query)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

from ml_core.candidates import Encoder
from ml_core.manifest import read_manifest
from ml_core.records import Passage, Query
from ml_core.stages.context import (
    StageContext,
    StageError,
    StageOutput,
    load_passages,
    load_queries,
)
from ml_core.stages.generate import query_key

Qrels = dict[str, dict[str, int]]
SETUP_SCORES = "setup_scores.json"


class TwoTowers:
    """A model tuned on one side only (training.tune) as it searches: one encoder for the
    queries, the other for the passages."""

    def __init__(self, queries: Encoder, passages: Encoder) -> None:
        self.queries = queries
        self.passages = passages

    def encode_queries(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return self.queries.encode_queries(texts, batch_size=batch_size)

    def encode_passages(self, passages: Any, batch_size: int = 32) -> np.ndarray:
        return self.passages.encode_passages(passages, batch_size=batch_size)


def run(ctx: StageContext, out: Path) -> StageOutput:
    """Score the base and the tuned model on the customer's judgements (else the held-out
    synthetic queries) and write the report; returns ({queries}, the headline figures)."""
    from ml_core.evaluation import (
        ENCODE_BATCH_SIZE,
        build_report,
        evaluate_retriever,
        teacher_check,
    )
    from ml_core.report import REPORT_VERSION
    from ml_core.setups import DenseModel, compare_setups, corpus_documents
    from ml_core.student import Student, resolve_precision
    from ml_core.teacher import load_teacher

    cfg = ctx.config
    passages = load_passages(ctx)
    if ctx.eval_queries and ctx.eval_qrels:
        judgements = "customer"
        queries, qrels, excluded = _customer_judgements(ctx, ctx.eval_queries, ctx.eval_qrels)
        check_queries = queries
    else:
        judgements = "synthetic"
        excluded = 0
        queries, check_queries, qrels = _synthetic_judgements(ctx, passages)
    if not queries:
        if excluded:
            reason = "every judged query was also a training query"
        elif not cfg.generation.synthetic:
            reason = "a job without synthetic queries (generation.synthetic off) needs judgements"
        else:
            reason = "supply judgements or a larger passage sample"
        raise StageError(f"no evaluation queries: {reason}")

    history = json.loads((ctx.stage_dir("distill") / "history.json").read_text())
    # Training that never beat the base on dev loss exports the base's own weights (no
    # averaging), so the tuned model's scores are the base's: encoding the corpus again would
    # only cost time and add bf16 batch noise between two identical models.
    base_kept = history["best_epoch"] == 0
    base = Student.load(ctx.registry.path(cfg.student))
    precision = resolve_precision(cfg.encode_precision, base.device)
    base.encode_precision = precision
    base_vectors = np.load(ctx.stage_dir("filter") / "base_passage_vectors.npy")
    ctx.progress(0.05, f"evaluating base model on {len(queries)} queries")
    base_metrics = evaluate_retriever(base, passages, queries, qrels, passage_vectors=base_vectors)
    dense = [DenseModel("base", base, base_vectors, base.max_seq_length)]
    if base_kept:
        ctx.progress(0.3, "training kept the base model: its scores are the tuned model's")
        tuned_metrics = copy.deepcopy(base_metrics)
    else:
        ctx.progress(0.3, "evaluating tuned model")
        tuned_student = Student.load(ctx.stage_dir("distill") / "model")
        tuned_student.encode_precision = precision
        tuned: Encoder = tuned_student
        if cfg.training.tune == "queries":
            # Only the query side trained: the passages keep the base's vectors.
            tuned = TwoTowers(tuned_student, base)
            tuned_vectors = base_vectors
        else:
            if cfg.training.tune == "passages":
                tuned = TwoTowers(base, tuned_student)  # the queries keep the base's
            tuned_vectors = tuned.encode_passages(passages, batch_size=ENCODE_BATCH_SIZE)
        tuned_metrics = evaluate_retriever(tuned, passages, queries, qrels,
                                           passage_vectors=tuned_vectors)
        dense.append(DenseModel("tuned", tuned, tuned_vectors, tuned_student.max_seq_length))
    ctx.progress(0.55, "comparing BM25, hybrid" + (" and whole-document" if
                       cfg.evaluation.whole_documents else "") + " retrieval")
    setup_scores: dict[str, dict[str, float]] = {}
    retrievers = compare_setups(
        dense, passages, corpus_documents(ctx.corpus_path, passages), queries, qrels,
        chunk_tokens=min(cfg.training.max_passage_length, base.max_passage_length),
        chunk_overlap_tokens=cfg.corpus.chunk_overlap_tokens,
        per_query=setup_scores,
        whole_documents=cfg.evaluation.whole_documents,
    )
    # Each set-up row's nDCG@10 per query, beside the report (which keeps only the rows'
    # means): what pairs one job's set-ups with another's on the same judgements.
    (out / SETUP_SCORES).write_text(json.dumps(setup_scores))
    ctx.progress(0.75, "checking the teacher against the student")
    teacher = load_teacher(ctx.registry.get(cfg.teacher), ctx.registry)
    check = teacher_check(
        base,
        teacher,
        passages,
        check_queries,
        qrels,
        passage_vectors=base_vectors,
        depth=cfg.evaluation.teacher_check_depth,
        max_queries=cfg.evaluation.teacher_check_queries,
        seed=cfg.seed,
    )
    distill_counts = (read_manifest(ctx.stage_dir("distill")) or {}).get("counts", {})
    report = build_report(base_metrics, tuned_metrics, check, cfg.evaluation, judgements,
                          base_kept=base_kept, dev_queries=distill_counts.get("dev_queries"))
    report["models"] = {"student": cfg.student, "teacher": cfg.teacher, "generator": cfg.generator}
    if cfg.candidates.co_teachers:
        report["models"]["co_teachers"] = cfg.candidates.co_teachers
    report["encode_precision"] = precision
    if excluded:
        report["excluded_trained_queries"] = excluded
    report["version"] = REPORT_VERSION
    report["retrievers"] = retrievers
    report["recipe"] = cfg.model_dump(mode="json")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return {"queries": len(queries)}, {
        "base_ndcg@10": report["base"]["ndcg@10"],
        "tuned_ndcg@10": report["tuned"]["ndcg@10"],
        "recommended": report["recommended"],
        "best_setup": retrievers["best"]["setup"],
    }


def _customer_judgements(
    ctx: StageContext, queries_path: Path, qrels_path: Path
) -> tuple[list[Query], Qrels, int]:
    """The customer's judged queries, less those also given as training queries or as example
    queries (either would grade the model on its own homework); returns (queries, qrels, how
    many were left out)."""
    from ml_core.corpus import read_qrels, read_queries

    queries = list(read_queries(queries_path))
    qrels = read_qrels(qrels_path)
    queries = [q for q in queries if q.id in qrels]
    trained = {
        query_key(q.text)
        for q in load_queries(ctx.stage_dir("generate") / "queries.jsonl")
        if not q.source_id
    } | {query_key(text) for text in ctx.config.generation.example_queries}
    kept = [q for q in queries if query_key(q.text) not in trained]
    return kept, qrels, len(queries) - len(kept)


def _synthetic_judgements(
    ctx: StageContext, passages: list[Passage]
) -> tuple[list[Query], list[Query], Qrels]:
    """(held-out queries the teacher confirmed, every held-out query, their source documents).

    Base vs tuned is scored on the confirmed ones, which drops the generator's misses; the
    teacher check uses all of them, since on the confirmed ones the teacher wins by construction.
    """
    generated = load_queries(ctx.stage_dir("generate") / "queries.jsonl")
    kept = {q.id for q in load_queries(ctx.stage_dir("filter") / "queries.jsonl")}
    by_id = {p.id: p for p in passages}
    held_out = [q for q in generated if q.split == "test"]
    qrels = {q.id: {by_id[q.source_id].document_id: 1} for q in held_out}
    return [q for q in held_out if q.id in kept], held_out, qrels
