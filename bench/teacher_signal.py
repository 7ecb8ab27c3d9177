"""Teacher-signal benchmark: how well each training signal orders a query's candidate list,
measured on the dataset's judged queries.

    python -m bench.teacher_signal [--datasets cranfield scifact-dev] [--helpers bge-small]
                                   [--queries N] [--work var/bench-teacher-signal]
                                   [--out bench/results/teacher-signal.json]

Distillation can only teach the student the order its target gives, so the target's quality is
the recipe's ceiling (the paper's "the teacher is the ceiling"). For every judged query this
mines the default recipe's candidates twice, as the filter stage does: the student's top k fused
with BM25's, and the same with each `--helpers` retriever's dense top k joining the fusion
(`candidates.helpers`). The teacher scores both lists; each list is then ordered by its RRF
evidence alone, by the cross-encoder alone, and by the recipe's fused signal
(ml_core.candidates.teacher_signal), followed by the rest of the student's ranking and pooled to
documents. Prints nDCG@10 per signal and its paired difference from the default recipe's signal
(the fused one on the student + BM25 list), and writes JSON. The judged queries are the
dataset's real ones, not the synthetic queries the filter sees: a proxy for the target's
quality, never data that training or the quality benchmark's scores select on. Encodings are
cached in the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality import DATASETS_ROOT, QRELS
from ml_core.__main__ import default_model_store
from ml_core.candidates import mine_candidates, teacher_signal
from ml_core.config import RecipeConfig, build_config
from ml_core.corpus import read_qrels, read_queries
from ml_core.evaluation import metrics_from_rankings, paired_difference, pool_to_documents
from ml_core.pipeline import StageContext, load_passages, run_stage
from ml_core.records import Passage, Query
from ml_core.registry import ModelRegistry
from ml_core.student import Student, passage_text, resolve_precision
from ml_core.teacher import load_teacher

# Deep enough for the student's tail behind a re-ordered head (documents, after pooling).
TAIL_DEPTH = 200
REFERENCE = "fused"


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


def run(data: Path, qrels_path: Path, helpers: list[str], work: Path,
        registry: ModelRegistry, config: RecipeConfig | None = None,
        max_queries: int = 0) -> dict[str, Any]:
    """nDCG@10 of every signal on the judged queries of one BEIR folder (see the module doc);
    on a seeded sample of `max_queries` of them when that is not 0."""
    config = config or build_config("default")
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
    pools = {
        "": mine_candidates(queries, passages, student, deep, student_vectors),
        "+helpers": mine_candidates(queries, passages, student, deep, student_vectors,
                                    helpers=helper_inputs),
    }
    seconds["retrieve"] = time.perf_counter() - start

    pairs = sorted({(q.id, pid) for q in queries for mined in pools.values()
                    for pid in mined[q.id].passage_ids})
    text = {q.id: q.text for q in queries}
    start = time.perf_counter()
    teacher = load_teacher(registry.get(config.teacher), registry)
    raw = np.asarray(teacher.score([(text[qid], passage_text(by_id[pid])) for qid, pid in pairs],
                                   batch_size=cfg.teacher_batch_size), dtype=np.float64)
    seconds["teacher"] = time.perf_counter() - start
    raw_of = {pair: float(value) for pair, value in zip(pairs, raw, strict=True)}
    low = float(np.percentile(raw, cfg.norm_low_percentile))
    high = float(np.percentile(raw, cfg.norm_high_percentile))

    signal_config = {name: cfg.model_copy(update={"teacher_signal": name})
                     for name in ("cross_encoder", "fused")}

    def ordered(query: Query, suffix: str, signal: str) -> list[str]:
        cand = pools[suffix][query.id]
        pids = cand.passage_ids
        if signal == "rrf":
            values = np.asarray(cand.rrf)
        else:
            raw_values = np.array([raw_of[(query.id, pid)] for pid in pids])
            values = teacher_signal(pids, raw_values, cand, low, high, signal_config[signal])
        head = [pids[i] for i in np.argsort(-values, kind="stable")]
        in_head = set(head)
        tail = [pid for pid in cand.student_ids if pid not in in_head]
        return pool_to_documents(head + tail, document_of)

    rankings: dict[str, dict[str, list[str]]] = {
        "student": {q.id: pool_to_documents(pools[""][q.id].student_ids, document_of)
                    for q in queries},
    }
    for suffix in pools:
        for signal in ("rrf", "cross_encoder", "fused"):
            rankings[signal + suffix] = {q.id: ordered(q, suffix, signal) for q in queries}
    metrics = {name: metrics_from_rankings(r, qrels, (10, 100), keep_per_query=True)
               for name, r in rankings.items()}
    reference = metrics[REFERENCE]["per_query"]
    rows: dict[str, Any] = {}
    for name, row in metrics.items():
        rows[name] = {key: value for key, value in row.items() if key != "per_query"}
        if name != REFERENCE:
            rows[name]["vs_" + REFERENCE] = paired_difference(reference, row["per_query"])
    overlap = np.mean([
        len(set(pools[""][q.id].passage_ids) & set(pools["+helpers"][q.id].passage_ids))
        / len(pools[""][q.id].passage_ids) for q in queries
    ])
    return {
        "queries": len(queries),
        "chunks": len(passages),
        "top_k": cfg.top_k,
        "helpers": helpers,
        "teacher": config.teacher,
        "pairs_scored": len(pairs),
        "list_overlap": float(overlap),
        "systems": rows,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def print_table(name: str, result: dict[str, Any]) -> None:
    print(f"\n{name}: {result['queries']} judged queries, candidate lists of {result['top_k']}, "
          f"helpers {', '.join(result['helpers']) or 'none'} (lists overlap "
          f"{result['list_overlap']:.0%}); nDCG@10 of the list ordered by each signal")
    print(f"| {'signal':<22} | nDCG@10 | vs {REFERENCE} (the default) |")
    print(f"|{'-' * 24}|---------|{'-' * 40}|")
    for system, row in result["systems"].items():
        diff = row.get("vs_" + REFERENCE)
        text = "" if diff is None else (
            f"{diff['difference']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}], "
            f"p {diff['p_value']:.3f}")
        print(f"| {system:<22} | {row['ndcg@10']:.4f}  | {text:<38} |")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=sorted(QRELS), choices=sorted(QRELS))
    parser.add_argument("--helpers", nargs="*", default=["bge-small"])
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
                            max_queries=args.queries)
        print_table(name, results[name])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": os.environ.get("TAILOR_TORCH_THREADS", "all"),
        "datasets": results,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
