"""Retrieval set-ups benchmark: what the report's set-up rows say for the base model.

    TAILOR_TORCH_THREADS=1 nice python -m bench.setups [--dataset scifact-dev]
                                 [--out bench/results/setups-scifact-dev.json]

Chunks the dataset's corpus as the pipeline's prepare stage does (the default recipe), encodes
the chunks with the default student in fp32, and runs the evaluate stage's comparison
(ml_core.setups.compare_setups) on the dataset's judgements with the base model alone: BM25,
the base model on chunks and on whole documents cut at its length, and each fused with BM25
(RRF k=60). Prints the rows as the report's text does and writes them as JSON.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import sidebyside
from bench.quality import QRELS
from ml_core.config import RecipeConfig, build_config
from ml_core.corpus import read_qrels, read_queries
from ml_core.pipeline import StageContext, load_passages, run_stage
from ml_core.registry import ModelRegistry
from ml_core.report import setup_lines
from ml_core.setups import DenseModel, compare_setups, corpus_documents
from ml_core.student import Student


def run(data: Path, qrels_path: Path, work: Path, registry: ModelRegistry,
        config: RecipeConfig | None = None) -> dict[str, Any]:
    """The comparison's section for the base model on a BEIR folder, with its timings."""
    config = config or build_config("default")
    ctx = StageContext(work, data / "corpus.jsonl", config, registry)
    run_stage("prepare", ctx)
    passages = load_passages(ctx)
    student = Student.load(registry.path(config.student))
    student.encode_precision = "fp32"
    started = time.perf_counter()
    vectors = student.encode_passages(passages, batch_size=64)
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
    return {**section, "passages": len(passages), "encode_seconds": encode_seconds,
            "compare_seconds": time.perf_counter() - started}


def print_table(dataset: str, result: dict[str, Any]) -> None:
    print(f"\n{dataset}: {result['documents']} documents, {result['passages']} chunks "
          f"({result['chunked_documents']} documents chunked); chunks encoded in "
          f"{result['encode_seconds']:.0f} s, the comparison (whole documents re-encoded: "
          f"{result['encoded_documents']}) in {result['compare_seconds']:.0f} s")
    print("\n".join(setup_lines({"retrievers": result})))


def main(argv: list[str] | None = None) -> int:
    parser = sidebyside.parser(__doc__, "setups")
    args = parser.parse_args(argv)
    data = sidebyside.dataset_folder(args)
    result = run(data, data / QRELS[args.dataset], args.work / args.dataset,
                 ModelRegistry(args.store))
    return sidebyside.finish(args, result, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
