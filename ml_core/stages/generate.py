"""Generate: the sampled passages -> queries.jsonl (synthetic queries, one per passage per query
type, plus any the customer supplied as training queries)."""

from __future__ import annotations

import dataclasses
import unicodedata
from pathlib import Path
from typing import Any

from ml_core.config import LLM_QUERY_TYPES
from ml_core.records import Passage, Query, write_jsonl
from ml_core.stages.context import (
    StageContext,
    StageError,
    StageOutput,
    load_cheap_only,
    load_passages,
    load_splits,
)

# The query type of the customer's own queries (no source passage; see read_supplied_queries).
SUPPLIED = "supplied"


def run(ctx: StageContext, out: Path) -> StageOutput:
    """Write the synthetic and supplied training queries; returns ({queries, per_type}, {})."""
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
    cheap_only = load_cheap_only(ctx)
    sample = [by_id[pid] for pid in splits if pid not in cheap_only]
    extra = [by_id[pid] for pid in splits if pid in cheap_only]
    examples = example_pairs(cfg.generation.example_queries, list(by_id.values()))
    if examples:
        write_jsonl(out / "examples.jsonl",
                    ({"query": q, "passage_id": p.id} for q, p in examples))
    generator = None  # extractive query types only: no model to load
    if any(t in LLM_QUERY_TYPES for t in cfg.generation.query_types):
        # A hosted model behind an OpenAI-compatible endpoint is named, not stored locally.
        source = (
            cfg.generator if cfg.generation.backend == "openai"
            else ctx.registry.get(cfg.generator)
        )
        generator = load_generator(cfg.generation, source, ctx.registry)
    queries = generate_queries(sample, cfg.generation, generator, cfg.seed, ctx.progress,
                               extractive_only=extra,
                               examples=[(q, p.text) for q, p in examples])
    queries = [dataclasses.replace(q, split=splits[q.source_id]) for q in queries]
    if not queries:
        raise StageError("the generator produced no usable queries")
    queries += supplied
    write_jsonl(out / "queries.jsonl", queries)
    per_type: dict[str, int] = {}
    for q in queries:
        per_type[q.query_type] = per_type.get(q.query_type, 0) + 1
    stats: dict[str, Any] = {"queries": len(queries), "per_type": per_type}
    if examples:
        stats["example_queries"] = len(examples)
    if isinstance(generator, TransformersGenerator):
        stats["precision"] = generator.precision
    return stats, {}


def example_pairs(example_queries: list[str], passages: list[Passage]) -> list[tuple[str, Passage]]:
    """Each of the customer's example queries beside the passage BM25 ranks first for it: the
    like_examples type's few-shot turns (a passage, then the query a user wrote for it). No
    judgement is read; an example that shares no word with the corpus is left out, and
    StageError says so when that leaves none."""
    if not example_queries:
        return []
    from ml_core.retrieval import BM25Index

    _, ids = BM25Index(passages).search(example_queries, k=1)
    by_id = {p.id: p for p in passages}
    pairs = [(query, by_id[hits[0]]) for query, hits in zip(example_queries, ids, strict=True)
             if hits]
    if not pairs:
        raise StageError("none of generation.example_queries shares a word with the corpus, so "
                         "none can be shown beside a passage: give queries about this corpus")
    return pairs


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
