"""Encoding benchmark: whole-corpus student encoding in fp32 against bf16, side by side.

    python -m bench.encode [--dataset scifact-dev] [--limit 4096] [--repeats 2]
                           [--out bench/results/encode.json]

Chunks the dataset's corpus as the pipeline's prepare stage does (the default recipe), takes a
seeded sample of `--limit` chunks (0: all of them, and then also nDCG@10 on the dataset's
judgements with each format), and encodes it with the default student in fp32 and in bf16,
alternating `--repeats` times so both see the same machine. Prints a table (seconds, chunks per
second, the speed ratio, the cosine of each bf16 vector to its fp32 vector) and writes JSON.
bf16 is measured even where the hardware lacks it (it is then emulated and slow): the table says
which format `encode_precision: auto` picks on this machine.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import sidebyside
from bench.quality import QRELS
from ml_core.config import RecipeConfig, build_config
from ml_core.corpus import read_qrels, read_queries
from ml_core.evaluation import evaluate_retriever
from ml_core.pipeline import StageContext, load_passages, run_stage
from ml_core.registry import ModelRegistry
from ml_core.student import Student, resolve_precision

FORMATS = ("fp32", "bf16")


def run(data: Path, qrels_path: Path, limit: int, repeats: int, work: Path,
        registry: ModelRegistry, config: RecipeConfig | None = None,
        seed: int = 13) -> dict[str, Any]:
    """Times and agreement of fp32 and bf16 encoding of (a sample of) a BEIR folder's chunks."""
    config = config or build_config("default")
    ctx = StageContext(work, data / "corpus.jsonl", config, registry)
    run_stage("prepare", ctx)
    passages = load_passages(ctx)
    sample = passages if not limit or limit >= len(passages) else random.Random(seed).sample(
        passages, limit)
    student = Student.load(registry.path(config.student))
    student.encode_passages(sample[:64])  # warm up outside the timings
    seconds: dict[str, list[float]] = {name: [] for name in FORMATS}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for name in FORMATS:
            student.encode_precision = name
            start = time.perf_counter()
            vectors[name] = student.encode_passages(sample)
            seconds[name].append(time.perf_counter() - start)
    cosines = (vectors["fp32"] * vectors["bf16"]).sum(axis=1)
    best = {name: min(times) for name, times in seconds.items()}
    result: dict[str, Any] = {
        "chunks": len(sample),
        "corpus_chunks": len(passages),
        "seconds": seconds,
        "chunks_per_second": {name: len(sample) / best[name] for name in FORMATS},
        "speedup_bf16": best["fp32"] / best["bf16"],
        "cosine_min": float(cosines.min()),
        "cosine_mean": float(cosines.mean()),
        "auto_picks": resolve_precision("auto", student.device),
    }
    if len(sample) == len(passages):
        qrels = read_qrels(qrels_path)
        queries = [q for q in read_queries(data / "queries.jsonl") if q.id in qrels]
        result["ndcg@10"] = {}
        for name in FORMATS:
            student.encode_precision = name
            metrics = evaluate_retriever(student, passages, queries, qrels,
                                         passage_vectors=vectors[name])
            result["ndcg@10"][name] = metrics["ndcg@10"]
    return result


def print_table(dataset: str, result: dict[str, Any]) -> None:
    print(f"\n{dataset}: {result['chunks']} of {result['corpus_chunks']} chunks "
          f"(auto picks {result['auto_picks']} here)")
    print(f"{'format':<8}{'best s':>10}{'chunks/s':>10}{'nDCG@10':>10}")
    for name in FORMATS:
        ndcg = result.get("ndcg@10", {}).get(name)
        print(f"{name:<8}{min(result['seconds'][name]):>10.1f}"
              f"{result['chunks_per_second'][name]:>10.1f}"
              f"{(f'{ndcg:.4f}' if ndcg is not None else '-'):>10}")
    print(f"bf16 speed-up {result['speedup_bf16']:.2f}x; cosine to fp32: min "
          f"{result['cosine_min']:.6f}, mean {result['cosine_mean']:.6f}")


def main(argv: list[str] | None = None) -> int:
    parser = sidebyside.parser(__doc__, "encode", repeats=2)
    parser.add_argument("--limit", type=int, default=4096, help="chunks to encode (0: all)")
    args = parser.parse_args(argv)
    if args.limit < 0 or args.repeats < 1:
        parser.error("--limit must be >= 0 and --repeats >= 1")
    data = sidebyside.dataset_folder(args)
    result = run(data, data / QRELS[args.dataset], args.limit, args.repeats,
                 args.work / args.dataset, ModelRegistry(args.store))
    return sidebyside.finish(args, result, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
