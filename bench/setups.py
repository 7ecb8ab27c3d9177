"""Retrieval set-ups benchmark: what the report's set-up rows say for the base model.

    TAILOR_TORCH_THREADS=1 nice python -m bench.setups [--dataset scifact-dev]
                                 [--out bench/results/setups-scifact-dev.json]
                                 [--vectors CHUNK_VECTORS.npy]

Chunks the dataset's corpus as the pipeline's prepare stage does (the default recipe), encodes
the chunks with the default student in fp32, and runs the evaluate stage's comparison
(ml_core.setups.compare_setups) on the dataset's judgements with the base model alone: BM25,
the base model on chunks and on whole documents cut at its length, and each fused with BM25
(RRF k=60). Prints the rows as the report's text does and writes them as JSON.

The chunks' vectors are kept in the work folder (`<student>.npy`), so a second run encodes only
the whole documents; `--vectors` takes them from an earlier run of the same chunks instead
(any .npy with one row per chunk, in passages.jsonl's order, in the run's `--precision`: fp32
unless told; `auto` is what a job picks on the machine). Either way a seeded sample of
chunks is encoded again and must match, or the run stops.
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
from ml_core.pipeline import StageContext, load_passages, run_stage
from ml_core.registry import ModelRegistry
from ml_core.report import setup_lines
from ml_core.setups import DenseModel, compare_setups, corpus_documents
from ml_core.student import Student, resolve_precision

# Chunks re-encoded to check stored vectors, and how far a row may be from them in each format
# (batch padding moves fp32 vectors by ~1e-7 and bf16 ones by ~1e-3; the two formats differ by
# ~1e-3, so fp32 catches bf16 vectors and bf16 a wrong model or wrong chunks).
CHECKED_CHUNKS = 32
MATCH_ATOL = {"fp32": 1e-4, "bf16": 5e-3}


def _cached_vectors(student: Student, passages: list[Any], path: Path) -> np.ndarray | None:
    """Stored vectors of `passages` if `path` holds one row per chunk that re-encodes the same
    (checked on a seeded sample); None when there is no such file; ValueError on a mismatch."""
    if not path.is_file():
        return None
    vectors = np.load(path)
    if vectors.shape != (len(passages), student.dim):
        raise ValueError(f"{path}: {vectors.shape} vectors for {len(passages)} chunks of "
                         f"dimension {student.dim}")
    sample = sorted(random.Random(0).sample(range(len(passages)),
                                            min(CHECKED_CHUNKS, len(passages))))
    fresh = student.encode_passages([passages[i] for i in sample], batch_size=64)
    worst = float(np.abs(fresh - vectors[sample]).max())
    limit = MATCH_ATOL[student.encode_precision]
    if worst > limit:
        raise ValueError(f"{path}: re-encoded chunks differ by up to {worst:.2e} (more than "
                         f"{limit:.0e}): not this model's {student.encode_precision} vectors of "
                         "these chunks")
    return vectors


def run(data: Path, qrels_path: Path, work: Path, registry: ModelRegistry,
        config: RecipeConfig | None = None, vectors_path: Path | None = None,
        precision: str = "fp32") -> dict[str, Any]:
    """The comparison's section for the base model on a BEIR folder, with its timings."""
    config = config or build_config("default")
    ctx = StageContext(work, data / "corpus.jsonl", config, registry)
    run_stage("prepare", ctx)
    passages = load_passages(ctx)
    student = Student.load(registry.path(config.student))
    student.encode_precision = resolve_precision(precision, student.device)
    started = time.perf_counter()
    cache = work / f"{config.student}-{student.encode_precision}.npy"
    vectors = _cached_vectors(student, passages, vectors_path or cache)
    if vectors is None:
        vectors = student.encode_passages(passages, batch_size=64)
        np.save(cache, vectors)
    encode_seconds = time.perf_counter() - started
    qrels = read_qrels(qrels_path)
    queries = [q for q in read_queries(data / "queries.jsonl") if q.id in qrels]
    started = time.perf_counter()
    section = compare_setups(
        [DenseModel("base", student, vectors, student.max_seq_length)],
        passages, corpus_documents(data / "corpus.jsonl", passages), queries, qrels,
        chunk_tokens=min(config.training.max_passage_length, student.max_passage_length),
        chunk_overlap_tokens=config.corpus.chunk_overlap_tokens,
    )
    return {**section, "passages": len(passages), "precision": student.encode_precision,
            "encode_seconds": encode_seconds,
            "compare_seconds": time.perf_counter() - started}


def print_table(dataset: str, result: dict[str, Any]) -> None:
    print(f"\n{dataset}: {result['documents']} documents, {result['passages']} chunks "
          f"({result['chunked_documents']} documents chunked, {result['precision']}); chunk "
          f"vectors ready in {result['encode_seconds']:.0f} s, the comparison (whole "
          f"documents re-encoded: {result['encoded_documents']}) in "
          f"{result['compare_seconds']:.0f} s")
    print("\n".join(setup_lines({"retrievers": result})))


def main(argv: list[str] | None = None) -> int:
    parser = sidebyside.parser(__doc__, "setups")
    parser.add_argument("--vectors", type=Path, default=None,
                        help="the chunks' vectors from an earlier run (.npy)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                        help="encoding format (auto: what a job picks on this machine)")
    args = parser.parse_args(argv)
    data = sidebyside.dataset_folder(args)
    result = run(data, data / QRELS[args.dataset], args.work / args.dataset,
                 ModelRegistry(args.store), vectors_path=args.vectors, precision=args.precision)
    return sidebyside.finish(args, result, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
