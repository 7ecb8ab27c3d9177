"""The specialization pipeline: which stage consumes which artifact, in one place.

Stages (each a function of a StageContext, writing only under `workdir/<stage>/`):

    prepare   corpus file          -> passages.jsonl (hygiene + chunks), sample.jsonl (splits)
    generate  sample               -> queries.jsonl (synthetic queries, one per passage per type,
                                      and any the customer supplied: train_queries)
    filter    queries + passages   -> candidates.jsonl (teacher-scored lists), queries.jsonl (kept)
    distill   candidates + queries -> model/ (sentence-transformers folder), history.json
    evaluate  model + test queries -> report.json (base vs tuned, teacher check, recommendation)

A stage is finished when its manifest.json exists with the same fingerprint (its config sections
plus the fingerprints of what it read), so a rerun or a redelivered task skips finished stages and
a changed setting reruns exactly the stages downstream of it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml_core.config import LLM_QUERY_TYPES, RecipeConfig
from ml_core.errors import MLCoreError
from ml_core.records import (
    Passage,
    ProgressFn,
    Query,
    ScoredList,
    no_progress,
    read_jsonl,
    write_jsonl,
)
from ml_core.registry import ModelRegistry

STAGES: tuple[str, ...] = ("prepare", "generate", "filter", "distill", "evaluate")

# Which recipe sections (or "section.field"s) each stage reads, beyond its upstream stages'
# fingerprints. Prepare reads single fields of later sections: naming the whole sections would
# make a change of, say, the learning rate regenerate every query.
_STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": (
        "seed",
        "student",
        "corpus",
        "generation.passages",
        "training.max_passage_length",
        "training.dev_fraction",
        "evaluation.test_fraction",
    ),
    "generate": ("seed", "generator", "generation"),
    "filter": ("seed", "student", "teacher", "encode_precision", "candidates"),
    "distill": ("seed", "training"),
    "evaluate": ("encode_precision", "evaluation"),
}
_UPSTREAM: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "generate": ("prepare",),
    "filter": ("prepare", "generate"),
    "distill": ("prepare", "filter"),
    "evaluate": ("prepare", "generate", "filter", "distill"),
}
MANIFEST = "manifest.json"
# Outputs a stage keeps when it runs again, because they check their own inputs: training
# resumes a saved state only for the same starting weights, settings and data
# (ml_core.training). So a crashed run resumes mid-way, a change of what acts after training
# (training.AFTER_TRAINING, e.g. base_merge) re-exports without training again, and any other
# change trains from scratch over them. The worker mirrors exactly these folders.
_SELF_CHECKED: dict[str, tuple[str, ...]] = {"distill": ("state", "best", "best.old")}


class StageError(MLCoreError, RuntimeError):
    """A stage cannot run: missing upstream output, or inputs that leave nothing to do."""

    code = "stage_failed"


@dataclass
class StageContext:
    """Everything a stage needs: where to work, what to read, and whom to tell about progress."""

    workdir: Path
    corpus_path: Path
    config: RecipeConfig
    registry: ModelRegistry
    eval_queries: Path | None = None
    eval_qrels: Path | None = None
    progress: ProgressFn = no_progress
    # The customer's own queries without judgements (BEIR queries.jsonl, e.g. from a search
    # log): trained on beside the synthetic ones, their teacher's #1 as the positive.
    train_queries: Path | None = None

    def stage_dir(self, stage: str) -> Path:
        return self.workdir / stage


@dataclass
class StageResult:
    """What a stage did: its manifest, and whether it was skipped as already finished."""

    stage: str
    skipped: bool
    manifest: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_fingerprint(stage: str, ctx: StageContext) -> str:
    """The hash that decides whether a finished stage can be reused."""
    parts: dict[str, Any] = {"stage": stage, "config": section_hash(ctx.config, stage)}
    for upstream in _UPSTREAM[stage]:
        manifest = read_manifest(ctx.stage_dir(upstream))
        if manifest is None:
            raise StageError(f"stage {stage!r} needs stage {upstream!r} to finish first")
        parts[upstream] = manifest["fingerprint"]
    if stage == "prepare":
        parts["corpus"] = file_sha256(ctx.corpus_path)
    if stage == "generate" and ctx.train_queries:  # absent otherwise: older fingerprints hold
        parts["train_queries"] = file_sha256(ctx.train_queries)
    if stage == "evaluate":
        for name in ("eval_queries", "eval_qrels"):
            path = getattr(ctx, name)
            parts[name] = file_sha256(path) if path else None
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


# Settings added after stages had already run, with the value that does what the recipe did
# before them. At that value they are left out of the hash, so a stage that finished before the
# setting existed (a job resumed across an upgrade) keeps its fingerprint and is not redone.
_ADDED_SETTINGS: dict[tuple[str, str], Any] = {
    ("candidates", "helpers"): [],
    ("candidates", "round_trip_scope"): "passage",
    ("generation", "synthetic"): True,
}


def section_hash(config: RecipeConfig, stage: str) -> str:
    """sha256 of the recipe settings `stage` itself reads (its manifest's config_hash)."""
    data = config.model_dump(mode="json")
    for (section, key), neutral in _ADDED_SETTINGS.items():
        if data[section].get(key) == neutral:
            del data[section][key]
    picked: dict[str, Any] = {}
    for name in _STAGE_SECTIONS[stage]:
        section, _, field = name.partition(".")
        picked[name] = data[section][field] if field else data[section]
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The stage's manifest, or None when the stage has not finished."""
    path = stage_dir / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def is_finished(stage: str, ctx: StageContext) -> bool:
    """True when the stage's manifest matches the current config and upstream outputs."""
    manifest = read_manifest(ctx.stage_dir(stage))
    if manifest is None:
        return False
    try:
        return manifest["fingerprint"] == stage_fingerprint(stage, ctx)
    except StageError:
        return False


def run_stage(stage: str, ctx: StageContext) -> StageResult:
    """Run one stage unless its manifest says it already finished with the same inputs."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    fingerprint = stage_fingerprint(stage, ctx)
    out = ctx.stage_dir(stage)
    manifest = read_manifest(out)
    if manifest is not None and manifest["fingerprint"] == fingerprint:
        ctx.progress(1.0, f"{stage}: already finished, skipped")
        return StageResult(stage, True, manifest, manifest.get("metrics", {}))
    # A half-written or outdated stage folder is discarded, except what checks its own inputs
    # (_SELF_CHECKED: distill's training state, which is what lets training resume mid-run).
    started_for = out / ".fingerprint"
    if out.exists():
        for child in out.iterdir():
            if child.name in _SELF_CHECKED.get(stage, ()):
                continue
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    started_for.write_text(fingerprint)
    started = time.monotonic()
    counts, metrics = _RUNNERS[stage](ctx, out)
    manifest = {
        "stage": stage,
        "fingerprint": fingerprint,
        "config_hash": section_hash(ctx.config, stage),
        "inputs": {
            name: read_manifest(ctx.stage_dir(name))["fingerprint"]  # type: ignore[index]
            for name in _UPSTREAM[stage]
        },
        "counts": counts,
        "metrics": metrics,
        "seconds": round(time.monotonic() - started, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(out / MANIFEST)  # written last: its presence marks the stage finished
    ctx.progress(1.0, f"{stage}: done")
    return StageResult(stage, False, manifest, metrics)


def run_all(
    ctx: StageContext, on_stage: Callable[[str], ProgressFn] | None = None
) -> list[StageResult]:
    """Run every stage in order; `on_stage(name)` may supply a per-stage progress callback."""
    results = []
    for stage in STAGES:
        stage_ctx = ctx if on_stage is None else _with_progress(ctx, on_stage(stage))
        results.append(run_stage(stage, stage_ctx))
    return results


def _with_progress(ctx: StageContext, progress: ProgressFn) -> StageContext:
    return dataclasses.replace(ctx, progress=progress)


# ---------------------------------------------------------------------------------------------
# Artifact readers shared by the stages


def load_passages(ctx: StageContext) -> list[Passage]:
    """The prepared passages (after hygiene and chunking)."""
    return list(read_jsonl(ctx.stage_dir("prepare") / "passages.jsonl", Passage))


def load_splits(ctx: StageContext) -> dict[str, str]:
    """Sampled passage id -> "test" | "train" | "dev"."""
    rows = (json.loads(line) for line in (ctx.stage_dir("prepare") / "sample.jsonl").open())
    return {row["id"]: row["split"] for row in rows}


def load_queries(path: Path) -> list[Query]:
    return list(read_jsonl(path, Query))


def _student_spec(ctx: StageContext):  # noqa: ANN202 - ModelSpec, imported lazily with torch
    return ctx.registry.get(ctx.config.student)


# ---------------------------------------------------------------------------------------------
# The stages


def _prepare(ctx: StageContext, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from ml_core.candidates import split_by_passage
    from ml_core.corpus import chunk_passages, clean_passages, iter_corpus, sample_passages
    from ml_core.student import Student

    cfg = ctx.config
    ctx.progress(0.0, "reading corpus")
    documents = list(iter_corpus(ctx.corpus_path))
    cleaned, hygiene = clean_passages(documents, cfg.corpus)
    ctx.progress(0.3, "chunking long passages")
    student = Student.load(ctx.registry.path(cfg.student))
    max_tokens = min(cfg.training.max_passage_length, student.max_passage_length)
    passages = chunk_passages(
        cleaned,
        student.tokenizer,
        max_tokens,
        cfg.corpus.chunk_overlap_tokens,
        reserved_tokens=student.prefix_tokens("passage"),
    )
    if not passages:
        raise StageError("the corpus has no passages left after hygiene")
    write_jsonl(out / "passages.jsonl", passages)

    # Split by passage: test passages are held out of training entirely; the rest is 90/10.
    sample = sample_passages(passages, cfg.generation.passages, cfg.seed)
    ids = [p.id for p in sample]
    test_share = cfg.evaluation.test_fraction
    dev_share = cfg.training.dev_fraction * (1 - test_share)
    splits = split_by_passage(
        ids,
        {"test": test_share, "dev": dev_share, "train": 1 - test_share - dev_share},
        cfg.seed,
        groups={p.id: p.document_id for p in sample},
    )
    write_jsonl(out / "sample.jsonl", ({"id": pid, "split": splits[pid]} for pid in ids))
    (out / "hygiene.json").write_text(json.dumps(_as_dict(hygiene), indent=2))
    split_counts = {
        name: sum(1 for s in splits.values() if s == name) for name in ("train", "dev", "test")
    }
    counts = {
        "documents": len(documents),
        "passages": len(passages),
        "sampled": len(ids),
        **split_counts,
    }
    return counts, {"hygiene": _as_dict(hygiene)}


def _generate(ctx: StageContext, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from ml_core.generation import TransformersGenerator, generate_queries, load_generator

    cfg = ctx.config
    supplied = read_supplied_queries(ctx.train_queries) if ctx.train_queries else []
    if not cfg.generation.synthetic:
        if not supplied:
            raise StageError("generation.synthetic is off and no training queries were given: "
                             "supply the customer's queries or turn synthetic generation on")
        write_jsonl(out / "queries.jsonl", supplied)
        return {"queries": len(supplied), "per_type": {SUPPLIED: len(supplied)}}, {}
    splits = load_splits(ctx)
    by_id = {p.id: p for p in load_passages(ctx)}
    sample = [by_id[pid] for pid in splits]
    generator = None  # extractive query types only: no model to load
    if any(t in LLM_QUERY_TYPES for t in cfg.generation.query_types):
        # A hosted model behind an OpenAI-compatible endpoint is named, not stored locally.
        source = (
            cfg.generator if cfg.generation.backend == "openai"
            else ctx.registry.get(cfg.generator)
        )
        generator = load_generator(cfg.generation, source, ctx.registry)
    queries = generate_queries(sample, cfg.generation, generator, cfg.seed, ctx.progress)
    queries = [_with_split(q, splits[q.source_id]) for q in queries]
    if not queries:
        raise StageError("the generator produced no usable queries")
    queries += supplied
    write_jsonl(out / "queries.jsonl", queries)
    per_type: dict[str, int] = {}
    for q in queries:
        per_type[q.query_type] = per_type.get(q.query_type, 0) + 1
    stats: dict[str, Any] = {"queries": len(queries), "per_type": per_type}
    if isinstance(generator, TransformersGenerator):
        stats["precision"] = generator.precision
    return stats, {}


# The query type of the customer's own queries (no source passage; see read_supplied_queries).
SUPPLIED = "supplied"


def read_supplied_queries(path: Path) -> list[Query]:
    """The customer's unlabelled queries (BEIR queries.jsonl; CorpusError names a bad line) as
    training queries without a source passage: ids prefixed "supplied:" so they never meet a
    synthetic id, repeats (same normalised text) kept once so none sits in train and dev both.
    The split (train/dev) is drawn at training time."""
    from ml_core.corpus import read_queries

    seen: set[str] = set()
    queries = []
    for query in read_queries(path):
        key = query_key(query.text)
        if key and key not in seen:
            seen.add(key)
            queries.append(Query(f"{SUPPLIED}:{query.id}", query.text, SUPPLIED))
    return queries


def query_key(text: str) -> str:
    """When two queries are the same query: NFKC, case and spacing aside (digits count)."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _with_split(query: Query, split: str) -> Query:
    return Query(query.id, query.text, query.query_type, query.source_id, split)


def _filter(ctx: StageContext, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from ml_core.candidates import mine_candidates, score_and_filter
    from ml_core.student import Student, resolve_precision
    from ml_core.teacher import load_teacher

    cfg = ctx.config
    passages = load_passages(ctx)
    queries = load_queries(ctx.stage_dir("generate") / "queries.jsonl")
    student = Student.load(ctx.registry.path(cfg.student))
    student.encode_precision = resolve_precision(cfg.encode_precision, student.device)
    teacher = load_teacher(ctx.registry.get(cfg.teacher), ctx.registry)

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
        helpers=list(zip(helpers, helper_vectors, strict=True)),
    )
    result = score_and_filter(
        queries,
        candidates,
        passages,
        teacher,
        cfg.candidates,
        progress=lambda f, m: ctx.progress(0.3 + 0.7 * f, m),
    )
    if not result.lists:
        raise StageError("no synthetic query survived the teacher's round-trip filter")
    kept = {sl.query_id for sl in result.lists}
    write_jsonl(out / "candidates.jsonl", result.lists)
    write_jsonl(out / "relabeled.jsonl", result.relabeled)
    write_jsonl(
        out / "teacher_scores.jsonl",
        (
            {"query_id": qid, "passage_ids": list(scores), "raw_scores": list(scores.values())}
            for qid, scores in result.raw_scores.items()
        ),
    )
    write_jsonl(out / "queries.jsonl", (q for q in queries if q.id in kept))
    summary = {**result.summary, "helpers": helper_names}
    (out / "filter.json").write_text(json.dumps(summary, indent=2))
    return {"kept": len(kept), "generated": len(queries)}, summary


def _load_helper(ctx: StageContext, name: str):  # noqa: ANN202 - Student, imported lazily
    """A helper retriever (candidates.helpers) from the registry: a bi-encoder, not trained."""
    from ml_core.student import Student, resolve_precision

    try:
        spec = ctx.registry.get(name)
    except KeyError as exc:
        raise StageError(f"candidates.helpers: {exc.args[0]}") from None
    if spec.role != "student":
        raise StageError(f"candidates.helpers: model {name!r} is a {spec.role}, not a bi-encoder "
                         "(role student)")
    helper = Student.load(spec)
    helper.encode_precision = resolve_precision(ctx.config.encode_precision, helper.device)
    return helper


def _distill(ctx: StageContext, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from ml_core.candidates import split_by_passage
    from ml_core.student import Student
    from ml_core.training import CONFIG_FILE, average_with_base, train_student

    cfg = ctx.config
    passages = {p.id: p for p in load_passages(ctx)}
    queries = {q.id: q for q in load_queries(ctx.stage_dir("generate") / "queries.jsonl")}
    # Supplied queries have no source passage to split by: they split by themselves, seeded.
    supplied = [qid for qid, q in queries.items() if not q.source_id]
    dev = cfg.training.dev_fraction
    for qid, split in split_by_passage(supplied, {"train": 1 - dev, "dev": dev}, cfg.seed).items():
        queries[qid] = _with_split(queries[qid], split)
    splits = load_splits(ctx)
    test_ids = {pid for pid, split in splits.items() if split == "test"}
    train_lists: list[ScoredList] = []
    dev_lists: list[ScoredList] = []
    scored_lists = list(read_jsonl(ctx.stage_dir("filter") / "candidates.jsonl", ScoredList))
    relabeled = ctx.stage_dir("filter") / "relabeled.jsonl"
    if cfg.training.relabel_disagreements:
        if not relabeled.exists():
            raise StageError("filter output has no relabeled.jsonl (an older run): re-run filter")
        # Training lists only: dev loss (model selection) stays on round-trip-consistent queries.
        scored_lists += [
            scored
            for scored in read_jsonl(relabeled, ScoredList)
            if queries[scored.query_id].split == "train" and scored.passage_ids[0] not in test_ids
        ]
    for scored in scored_lists:
        split = queries[scored.query_id].split
        if split not in ("train", "dev") or scored.passage_ids[0] in test_ids:
            continue  # a supplied query's positive may be a held-out test passage
        # Test passages are never trained on, not even as negatives.
        keep = [i for i, pid in enumerate(scored.passage_ids) if i == 0 or pid not in test_ids]
        scored = ScoredList(
            scored.query_id,
            [scored.passage_ids[i] for i in keep],
            [scored.teacher_scores[i] for i in keep],
            [scored.raw_scores[i] for i in keep] if scored.raw_scores else [],
        )
        (train_lists if split == "train" else dev_lists).append(scored)
    if not train_lists:
        raise StageError("no training queries left after filtering")
    if not dev_lists:  # tiny corpora: hold out one training list so dev loss is still defined
        dev_lists = train_lists[-1:]
    student = Student.load(ctx.registry.path(cfg.student))
    result = train_student(
        student,
        train_lists,
        dev_lists,
        passages,
        queries,
        cfg.training,
        out,
        cfg.seed,
        ctx.progress,
    )
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    share = cfg.training.base_merge if not result.base_is_best else 0.0
    if share > 0:
        ctx.progress(1.0, f"averaging the best checkpoint with the base model ({share:g} base)")
        merged = Student.load(result.best_dir)
        average_with_base(merged, Student.load(ctx.registry.path(cfg.student)), share)
        merged.save(model_dir)
    else:
        shutil.copytree(result.best_dir, model_dir)
    # The best checkpoint may come from a finished run reused under other after-training
    # settings (base_merge): the exported config states the ones this model was made with.
    record = json.loads((result.best_dir / CONFIG_FILE).read_text())
    record["training"] = cfg.training.model_dump(mode="json")
    (model_dir / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    history = {
        "best_epoch": result.best_epoch,
        "steps": result.steps,
        "precision": result.precision,
        "stopped_early": result.stopped_early,
        "base_merge": share,
        "epochs": result.history,
    }
    (out / "history.json").write_text(json.dumps(history, indent=2))
    counts = {
        "train_queries": len(train_lists),
        "dev_queries": len(dev_lists),
        "steps": result.steps,
        "precision": result.precision,
    }
    return counts, {"best_epoch": result.best_epoch}


def _evaluate(ctx: StageContext, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from ml_core.corpus import read_qrels, read_queries
    from ml_core.evaluation import build_report, evaluate_retriever, teacher_check
    from ml_core.student import Student, resolve_precision
    from ml_core.teacher import load_teacher

    cfg = ctx.config
    passages = load_passages(ctx)
    if ctx.eval_queries and ctx.eval_qrels:
        judgements = "customer"
        queries = list(read_queries(ctx.eval_queries))
        qrels = read_qrels(ctx.eval_qrels)
        queries = [q for q in queries if q.id in qrels]
        # A judged query the model was trained on (given as a training query too) would grade
        # the model on its own homework: it is left out, and the report says how many were.
        trained = {
            query_key(q.text)
            for q in load_queries(ctx.stage_dir("generate") / "queries.jsonl")
            if not q.source_id
        }
        judged = len(queries)
        queries = [q for q in queries if query_key(q.text) not in trained]
        excluded = judged - len(queries)
        check_queries = queries
    else:
        judgements = "synthetic"
        excluded = 0
        generated = load_queries(ctx.stage_dir("generate") / "queries.jsonl")
        kept = {q.id for q in load_queries(ctx.stage_dir("filter") / "queries.jsonl")}
        by_id = {p.id: p for p in passages}
        held_out = [q for q in generated if q.split == "test"]
        qrels = {q.id: {by_id[q.source_id].document_id: 1} for q in held_out}
        # Base vs tuned on the held-out queries the teacher confirmed (round trip), which drops
        # the generator's misses. The teacher check uses all of them: on the confirmed ones the
        # teacher would win by construction.
        queries = [q for q in held_out if q.id in kept]
        check_queries = held_out
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
    if base_kept:
        ctx.progress(0.35, "training kept the base model: its scores are the tuned model's")
        tuned_metrics = copy.deepcopy(base_metrics)
    else:
        ctx.progress(0.35, "evaluating tuned model")
        tuned = Student.load(ctx.stage_dir("distill") / "model")
        tuned.encode_precision = precision
        tuned_metrics = evaluate_retriever(tuned, passages, queries, qrels)
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
    report["encode_precision"] = precision
    if excluded:
        report["excluded_trained_queries"] = excluded
    report["recipe"] = cfg.model_dump(mode="json")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return {"queries": len(queries)}, {
        "base_ndcg@10": report["base"]["ndcg@10"],
        "tuned_ndcg@10": report["tuned"]["ndcg@10"],
        "recommended": report["recommended"],
    }


def _as_dict(value: Any) -> dict[str, Any]:
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    return dict(value)


_RUNNERS: dict[str, Callable[[StageContext, Path], tuple[dict[str, Any], dict[str, Any]]]] = {
    "prepare": _prepare,
    "generate": _generate,
    "filter": _filter,
    "distill": _distill,
    "evaluate": _evaluate,
}
