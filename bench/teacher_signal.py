"""Teacher-signal benchmark: how well each training signal orders a query's candidate list,
measured on the dataset's judged queries.

    python -m bench.teacher_signal [--datasets cranfield scifact-dev] [--helpers bge-small]
                                   [--teachers ms-marco-minilm-l12 answerai-colbert-small]
                                   [--residual BETA ...] [--queries N]
                                   [--work var/bench-teacher-signal]
                                   [--out bench/results/teacher-signal.json]

Distillation can only teach the student the order its target gives, so the target's quality is
the recipe's ceiling (the paper's "the teacher is the ceiling"). For every judged query this
mines the default recipe's candidates twice, as the filter stage does: the student's top k fused
with BM25's, and the same with each `--helpers` retriever's dense top k joining the fusion
(`candidates.helpers`; none with a bare `--helpers`). Every `--teachers` model scores both
lists (the first is the job's teacher; the default pairs the cross-encoder with the
late-interaction teacher); each list is then ordered by its RRF evidence alone, by each teacher
alone (`cross_encoder`, `late_interaction`), by each fused with the rank evidence (`fused`,
the default, and `li_fused`), and with two teachers by their average (`teachers`,
`teachers_fused`: candidates.co_teachers), as ml_core.candidates.teacher_signal computes them,
followed by the rest of the student's ranking and pooled to documents. Prints nDCG@10 per
signal and its paired difference from the default recipe's signal (the fused one on the
student + BM25 list); the same ordering fused with BM25 as the report's hybrid rows fuse (RRF
with BM25 on whole documents, ml_core.setups), paired against the student fused with it: what
a student that learned the signal could add to a hybrid search (`--residual` adds targets that
subtract BM25's score, for a student meant to complement it, or with a negative weight add it);
and each teacher's speed on the same pairs (scored in alternating slices of the queries, so a
change of load falls on both). Writes JSON. The judged queries are the dataset's real ones, not
the synthetic queries the filter sees: a proxy for the target's quality, never data that
training or the quality benchmark's scores select on. Encodings are cached in the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality import DATASETS_ROOT, QRELS
from ml_core.__main__ import default_model_store
from ml_core.candidates import combine_teachers, mine_candidates, teacher_signal
from ml_core.config import RecipeConfig, build_config
from ml_core.corpus import read_qrels, read_queries
from ml_core.evaluation import metrics_from_rankings, paired_difference, pool_to_documents
from ml_core.pipeline import StageContext, load_passages, run_stage
from ml_core.records import Passage, Query
from ml_core.registry import ModelRegistry
from ml_core.retrieval import BM25Index
from ml_core.setups import DEPTH, corpus_documents, fuse_rankings
from ml_core.student import Student, passage_text, resolve_precision
from ml_core.teacher import load_teacher
from ml_core.teacher_signals import minmax

# Deep enough for the student's tail behind a re-ordered head (documents, after pooling).
TAIL_DEPTH = 200
REFERENCE = "fused"
DEFAULT_TEACHERS = ["ms-marco-minilm-l12", "answerai-colbert-small"]
# Slices of the queries the teachers take turns on when timed.
SPEED_SLICES = 4
# A signal's name for a teacher scored alone and fused with the ranks, by its scoring.
ALONE = {"cross_encoder": ("cross_encoder", "fused"),
         "late_interaction": ("late_interaction", "li_fused")}
# The signals a residual target (`--residual`) is formed from.
RESIDUAL_OF = ("fused", "cross_encoder")


def _encoder(registry: ModelRegistry, name: str, config: RecipeConfig) -> Student:
    encoder = Student.load(registry.path(name))
    encoder.encode_precision = resolve_precision(config.encode_precision, encoder.device)
    return encoder


def _vectors(encoder: Student, passages: list[Passage], cache: Path) -> np.ndarray:
    if cache.is_file():
        vectors = np.load(cache)
        if len(vectors) == len(passages):
            return vectors
    vectors = encoder.encode_passages(passages)
    np.save(cache, vectors)
    return vectors


def score_side_by_side(teachers: list[Any], pairs: list[tuple[str, str]], texts: list[tuple[str,
                       str]], batch_size: int) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Every teacher's scores for `texts` (aligned with `pairs`, (query id, passage id)), and
    its speed: the queries are cut into SPEED_SLICES slices and the teachers take turns on each
    (the order alternating), so both see the same load. A late-interaction teacher keeps its
    encoded passages across slices, as it does across a job's calls."""
    query_ids = sorted({qid for qid, _ in pairs})
    slice_of = {qid: i * SPEED_SLICES // len(query_ids) for i, qid in enumerate(query_ids)}
    slices = [[i for i, (qid, _) in enumerate(pairs) if slice_of[qid] == n]
              for n in range(SPEED_SLICES)]
    scores = [np.zeros(len(pairs)) for _ in teachers]
    seconds = [0.0 for _ in teachers]
    for n, index in enumerate(slices):
        order = range(len(teachers)) if n % 2 == 0 else reversed(range(len(teachers)))
        for t in order:
            start = time.perf_counter()
            scores[t][index] = teachers[t].score([texts[i] for i in index],
                                                 batch_size=batch_size)
            seconds[t] += time.perf_counter() - start
    speed = []
    for teacher, spent in zip(teachers, seconds, strict=True):
        row = {"teacher": teacher.name, "scoring": teacher.spec.scoring, "pairs": len(pairs),
               "seconds": round(spent, 1), "pairs_per_s": round(len(pairs) / spent, 2)}
        cache = getattr(teacher, "cache", None)
        if cache is not None:
            row["passages_encoded"] = cache.misses
            row["distinct_queries"] = len(query_ids)
        speed.append(row)
    return scores, speed


def residual_name(signal: str, beta: float) -> str:
    """A residual target's row name, e.g. "fused-0.25bm25"; a negative weight adds BM25's
    score, e.g. "fused+0.5bm25"."""
    return f"{signal}{'-' if beta >= 0 else '+'}{abs(beta):g}bm25"


def run(data: Path, qrels_path: Path, helpers: list[str], work: Path,
        registry: ModelRegistry, config: RecipeConfig | None = None,
        max_queries: int = 0, teacher_names: list[str] | None = None,
        residual: list[float] | None = None) -> dict[str, Any]:
    """nDCG@10 of every signal on the judged queries of one BEIR folder (see the module doc);
    on a seeded sample of `max_queries` of them when that is not 0. `teacher_names`: the
    job's teacher first (default: the config's), then a co-teacher. `residual`: weights beta
    of residual targets, each RESIDUAL_OF signal minus beta x the candidates' BM25 scores
    (min-max within the list), on the default's lists (no helpers): the order a student would
    learn if BM25's score were added to its own before the softmax, so that the sum matched
    the signal."""
    residual = residual or []
    config = config or build_config("default")
    teacher_names = teacher_names or [config.teacher]
    work.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(work, data / "corpus.jsonl", config, registry)
    run_stage("prepare", ctx)
    passages = load_passages(ctx)
    by_id = {p.id: p for p in passages}
    document_of = {p.id: p.document_id for p in passages}
    qrels = read_qrels(qrels_path)
    queries = [q for q in read_queries(data / "queries.jsonl") if q.id in qrels]
    if max_queries and len(queries) > max_queries:
        queries = random.Random(config.seed).sample(queries, max_queries)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    student = _encoder(registry, config.student, config)
    student_vectors = _vectors(student, passages, work / f"{config.student}.npy")
    helper_models = [(_encoder(registry, name, config), name) for name in helpers]
    helper_inputs = [(model, _vectors(model, passages, work / f"{name}.npy"))
                     for model, name in helper_models]
    seconds["encode"] = time.perf_counter() - start

    cfg = config.candidates
    deep = cfg.model_copy(update={"student_top_n": max(cfg.student_top_n, TAIL_DEPTH)})
    start = time.perf_counter()
    pools = {"": mine_candidates(queries, passages, student, deep, student_vectors)}
    if helper_inputs:
        pools["+helpers"] = mine_candidates(queries, passages, student, deep, student_vectors,
                                            helpers=helper_inputs)
    seconds["retrieve"] = time.perf_counter() - start

    pairs = sorted({(q.id, pid) for q in queries for mined in pools.values()
                    for pid in mined[q.id].passage_ids})
    text = {q.id: q.text for q in queries}
    start = time.perf_counter()
    teachers = [load_teacher(registry.get(name), registry) for name in teacher_names]
    seconds["load_teachers"] = time.perf_counter() - start
    texts = [(text[qid], passage_text(by_id[pid])) for qid, pid in pairs]
    raws, speed = score_side_by_side(teachers, pairs, texts, cfg.teacher_batch_size)
    for teacher, row in zip(teachers, speed, strict=True):
        seconds["teacher " + teacher.name] = row["seconds"]
    by_teacher = [{} for _ in teachers]
    for raw_by, raw in zip(by_teacher, raws, strict=True):
        for (qid, pid), value in zip(pairs, raw, strict=True):
            raw_by.setdefault(qid, {})[pid] = float(value)

    # signal name -> (its raw scores {query id: {passage id: score}}, teacher_signal setting)
    sources: dict[str, tuple[dict[str, dict[str, float]], str]] = {}
    for teacher, raw_by in zip(teachers, by_teacher, strict=True):
        alone, fused = ALONE[teacher.spec.scoring]
        if alone in sources:  # two teachers of one kind: name them
            alone, fused = f"{alone}:{teacher.name}", f"{fused}:{teacher.name}"
        sources[alone] = (raw_by, "cross_encoder")
        sources[fused] = (raw_by, "fused")
    if len(teachers) > 1:
        combined = combine_teachers(by_teacher, cfg)
        sources["teachers"] = (combined, "teachers")
        sources["teachers_fused"] = (combined, "teachers_fused")
    spans = {}
    for name, (raw_by, _) in sources.items():
        values = [v for scores in raw_by.values() for v in scores.values()]
        spans[name] = (float(np.percentile(values, cfg.norm_low_percentile)),
                       float(np.percentile(values, cfg.norm_high_percentile)))
    signal_config = {name: cfg.model_copy(update={"teacher_signal": setting})
                     for name, (_, setting) in sources.items()}
    residuals = {residual_name(signal, beta): (signal, beta)
                 for signal in RESIDUAL_OF if signal in sources for beta in residual}
    # {query id: {candidate passage id: its BM25 score}} (absent: no matching term, 0).
    bm25_scores: dict[str, dict[str, float]] = {}
    if residuals:
        index = BM25Index(passages)
        for start in range(0, len(queries), 64):  # every passage's score, a slice at a time
            batch = queries[start:start + 64]
            found, found_ids = index.search([q.text for q in batch], len(passages))
            for query, values, ids in zip(batch, found, found_ids, strict=True):
                listed = {pid for mined in pools.values() for pid in mined[query.id].passage_ids}
                bm25_scores[query.id] = {pid: value for pid, value in zip(ids, values, strict=True)
                                         if pid in listed}

    def signal_values(query: Query, suffix: str, signal: str) -> np.ndarray:
        cand = pools[suffix][query.id]
        raw_by = sources[signal][0][query.id]
        raw_values = np.array([raw_by[pid] for pid in cand.passage_ids])
        low, high = spans[signal]
        return teacher_signal(cand.passage_ids, raw_values, cand, low, high,
                              signal_config[signal])

    def ordered(query: Query, suffix: str, signal: str) -> list[str]:
        cand = pools[suffix][query.id]
        pids = cand.passage_ids
        if signal == "rrf":
            values = np.asarray(cand.rrf)
        elif signal in residuals:
            base, beta = residuals[signal]
            bm25 = np.array([bm25_scores[query.id].get(pid, 0.0) for pid in pids])
            values = signal_values(query, suffix, base) - beta * minmax(bm25, bm25.min(),
                                                                        bm25.max())
        else:
            values = signal_values(query, suffix, signal)
        head = [pids[i] for i in np.argsort(-values, kind="stable")]
        in_head = set(head)
        tail = [pid for pid in cand.student_ids if pid not in in_head]
        return pool_to_documents(head + tail, document_of)

    rankings: dict[str, dict[str, list[str]]] = {
        "student": {q.id: pool_to_documents(pools[""][q.id].student_ids, document_of)
                    for q in queries},
    }
    for suffix in pools:
        for signal in ("rrf", *sources, *(residuals if suffix == "" else ())):
            rankings[signal + suffix] = {q.id: ordered(q, suffix, signal) for q in queries}
    metrics = {name: metrics_from_rankings(r, qrels, (10, 100), keep_per_query=True)
               for name, r in rankings.items()}
    # Each ordering as a student that learned it would rank, fused with BM25 as the report's
    # hybrid rows fuse (whole documents, RRF): what the signal could add to a hybrid search.
    # A ranking pooled from TAIL_DEPTH chunks may hold under DEPTH documents where documents
    # have many chunks; the ones it lacks would rank below all it holds, where RRF adds little.
    start = time.perf_counter()
    documents = corpus_documents(data / "corpus.jsonl", passages)
    _, bm25_ids = BM25Index(documents).search([q.text for q in queries], DEPTH)
    bm25_docs = {q.id: ids for q, ids in zip(queries, bm25_ids, strict=True)}
    hybrid = {name: metrics_from_rankings(fuse_rankings(r, bm25_docs), qrels, (10, 100),
                                          keep_per_query=True)
              for name, r in rankings.items()}
    seconds["hybrid"] = time.perf_counter() - start
    reference = metrics[REFERENCE]["per_query"]
    base_hybrid = hybrid["student"]["per_query"]
    rows: dict[str, Any] = {}
    for name, row in metrics.items():
        rows[name] = {key: value for key, value in row.items() if key != "per_query"}
        if name != REFERENCE:
            rows[name]["vs_" + REFERENCE] = paired_difference(reference, row["per_query"])
        rows[name]["hybrid"] = {
            key: value for key, value in hybrid[name].items() if key != "per_query"}
        if name != "student":
            rows[name]["hybrid"]["vs_student"] = paired_difference(
                base_hybrid, hybrid[name]["per_query"])
    overlap = np.mean([
        len(set(pools[""][q.id].passage_ids) & set(pools["+helpers"][q.id].passage_ids))
        / len(pools[""][q.id].passage_ids) for q in queries
    ]) if "+helpers" in pools else 1.0
    return {
        "queries": len(queries),
        "chunks": len(passages),
        "top_k": cfg.top_k,
        "helpers": helpers,
        "teacher": teacher_names[0],
        "teachers": teacher_names,
        "residual": residual,
        "fusion": {"method": "rrf", "with": "bm25 on whole documents", "depth": DEPTH},
        "pairs_scored": len(pairs),
        "speed": speed,
        "list_overlap": float(overlap),
        "systems": rows,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def print_table(name: str, result: dict[str, Any]) -> None:
    print(f"\n{name}: {result['queries']} judged queries, candidate lists of {result['top_k']}, "
          f"helpers {', '.join(result['helpers']) or 'none'} (lists overlap "
          f"{result['list_overlap']:.0%}); nDCG@10 of the list ordered by each signal")
    print(f"| {'signal':<22} | nDCG@10 | vs {REFERENCE} (the default) {'':<8}"
          f"| + BM25  | vs student + BM25 {'':<19}|")
    print(f"|{'-' * 24}|---------|{'-' * 40}|---------|{'-' * 39}|")

    def versus(diff: dict[str, Any] | None) -> str:
        return "" if diff is None else (
            f"{diff['difference']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}], "
            f"p {diff['p_value']:.3f}")

    for system, row in result["systems"].items():
        hybrid = row["hybrid"]
        print(f"| {system:<22} | {row['ndcg@10']:.4f}  | {versus(row.get('vs_' + REFERENCE)):<38} "
              f"| {hybrid['ndcg@10']:.4f}  | {versus(hybrid.get('vs_student')):<37} |")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))
    print("teacher speed on the same pairs (shared machine): " + "; ".join(
        f"{row['teacher']} {row['pairs_per_s']:.1f} pairs/s ({row['pairs']} pairs in "
        f"{row['seconds']:.0f} s" + (f", {row['passages_encoded']} passages encoded"
                                     if "passages_encoded" in row else "") + ")"
        for row in result["speed"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=sorted(QRELS), choices=sorted(QRELS))
    parser.add_argument("--helpers", nargs="*", default=["bge-small"])
    parser.add_argument("--teachers", nargs="+", default=DEFAULT_TEACHERS,
                        help="the job's teacher, then a co-teacher (default: %(default)s)")
    parser.add_argument("--residual", type=float, nargs="*", default=[],
                        help="residual targets: the fused and cross-encoder signals minus "
                             "BETA x BM25's score (min-max within the list), per BETA; a "
                             "negative BETA adds it")
    parser.add_argument("--queries", type=int, default=0,
                        help="a seeded sample of this many judged queries (default: all)")
    parser.add_argument("--work", type=Path, default=Path("var/bench-teacher-signal"))
    parser.add_argument("--store", type=Path, default=default_model_store())
    parser.add_argument("--out", type=Path, default=Path("bench/results/teacher-signal.json"))
    args = parser.parse_args(argv)
    registry = ModelRegistry(args.store)
    results = {}
    for name in args.datasets:
        data = DATASETS_ROOT / name
        results[name] = run(data, data / QRELS[name], args.helpers, args.work / name, registry,
                            max_queries=args.queries, teacher_names=args.teachers,
                            residual=args.residual)
        print_table(name, results[name])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": os.environ.get("TAILOR_TORCH_THREADS", "all"),
        "command": "python -m bench.teacher_signal " + " ".join(argv or sys.argv[1:]),
        "datasets": results,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
