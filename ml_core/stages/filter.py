"""Filter: queries + passages -> candidates.jsonl (teacher-scored lists) and queries.jsonl (the
queries the round trip kept)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ml_core.records import write_jsonl
from ml_core.stages.context import (
    StageContext,
    StageError,
    StageOutput,
    load_passages,
    load_queries,
)

if TYPE_CHECKING:
    from ml_core.registry import ModelSpec
    from ml_core.student import Student
    from ml_core.teacher import Teacher


def run(ctx: StageContext, out: Path) -> StageOutput:
    """Mine candidates (student + BM25 + helpers, fused), score them with the teacher and keep
    the queries that pass the round trip; returns ({kept, generated}, the filter's summary)."""
    from ml_core.candidates import mine_candidates, score_and_filter
    from ml_core.student import Student, resolve_precision
    from ml_core.teacher import load_teacher

    cfg = ctx.config
    passages = load_passages(ctx)
    queries = load_queries(ctx.stage_dir("generate") / "queries.jsonl")
    student = Student.load(ctx.registry.path(cfg.student))
    student.encode_precision = resolve_precision(cfg.encode_precision, student.device)
    teacher = load_teacher(ctx.registry.get(cfg.teacher), ctx.registry)
    co_teachers = [_load_co_teacher(ctx, name) for name in cfg.candidates.co_teachers]

    helper_names = [name for name in cfg.candidates.helpers if name != cfg.student]
    helpers = [_load_helper(ctx, name) for name in helper_names]

    ctx.progress(0.0, f"encoding {len(passages)} passages with the student "
                      f"({student.encode_precision})")
    vectors = student.encode_passages(passages)
    np.save(out / "base_passage_vectors.npy", vectors)  # reused by evaluate for the base model
    helper_vectors = []
    for n, (name, helper) in enumerate(zip(helper_names, helpers, strict=True)):
        ctx.progress(0.1 + 0.1 * n / len(helpers),
                     f"encoding {len(passages)} passages with helper {name!r}")
        helper_vectors.append(helper.encode_passages(passages))
    ctx.progress(0.2, "retrieving candidates (student + BM25"
                      + "".join(f" + {name}" for name in helper_names) + ", fused)")
    candidates = mine_candidates(
        queries, passages, student, cfg.candidates, passage_vectors=vectors,
        helpers=list(zip(helpers, helper_vectors, strict=True)), seed=ctx.config.seed,
    )
    result = score_and_filter(
        queries,
        candidates,
        passages,
        teacher,
        cfg.candidates,
        progress=lambda f, m: ctx.progress(0.3 + 0.7 * f, m),
        co_teachers=co_teachers,
    )
    if not result.lists:
        raise StageError("no synthetic query survived the teacher's round-trip filter")
    kept = {sl.query_id for sl in result.lists}
    write_jsonl(out / "candidates.jsonl", result.lists)
    write_jsonl(out / "relabeled.jsonl", result.relabeled)
    # With co-teachers, raw_scores are their normalised average and each teacher's own follow.
    each = result.teacher_raw_scores
    write_jsonl(
        out / "teacher_scores.jsonl",
        (
            {"query_id": qid, "passage_ids": list(scores), "raw_scores": list(scores.values()),
             **({"teacher_raw_scores": [[raw[qid][pid] for pid in scores] for raw in each]}
                if each else {})}
            for qid, scores in result.raw_scores.items()
        ),
    )
    write_jsonl(out / "queries.jsonl", (q for q in queries if q.id in kept))
    summary = {**result.summary, "helpers": helper_names,
               **({"co_teachers": cfg.candidates.co_teachers} if co_teachers else {})}
    (out / "filter.json").write_text(json.dumps(summary, indent=2))
    return {"kept": len(kept), "generated": len(queries)}, summary


def _load_helper(ctx: StageContext, name: str) -> Student:
    """A helper retriever (candidates.helpers) from the registry: a bi-encoder, not trained."""
    from ml_core.student import Student, resolve_precision

    helper = Student.load(_spec_of(ctx, name, "candidates.helpers", "student",
                                   "a bi-encoder (role student)"))
    helper.encode_precision = resolve_precision(ctx.config.encode_precision, helper.device)
    return helper


def _load_co_teacher(ctx: StageContext, name: str) -> Teacher:
    """A co-teacher (candidates.co_teachers) from the registry."""
    from ml_core.teacher import load_teacher

    return load_teacher(_spec_of(ctx, name, "candidates.co_teachers", "teacher", "a teacher"),
                        ctx.registry)


def _spec_of(ctx: StageContext, name: str, setting: str, role: str, what: str) -> ModelSpec:
    """The registry's spec of `name`, named by `setting`; a StageError when it is missing or
    not of `role`."""
    try:
        spec = ctx.registry.get(name)
    except KeyError as exc:
        raise StageError(f"{setting}: {exc.args[0]}") from None
    if spec.role != role:
        raise StageError(f"{setting}: model {name!r} is a {spec.role}, not {what}")
    return spec
