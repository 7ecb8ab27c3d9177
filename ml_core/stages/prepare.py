"""Prepare: the corpus file -> passages.jsonl (hygiene, chunks) and sample.jsonl (the splits)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ml_core.records import Passage, write_jsonl
from ml_core.stages.context import StageContext, StageError, StageOutput


def run(ctx: StageContext, out: Path) -> StageOutput:
    """Clean and chunk the corpus, sample passages for generation (and more for the extractive
    query types, `generation.cheap_passages`) and split them by passage; returns (document,
    passage and split counts, {"hygiene": what hygiene dropped})."""
    from ml_core.candidates import split_by_passage
    from ml_core.corpus import iter_corpus
    from ml_core.passages import chunk_passages, clean_passages, sample_passages
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
    shares = {"test": test_share, "dev": dev_share, "train": 1 - test_share - dev_share}
    splits = split_by_passage(ids, shares, cfg.seed, groups={p.id: p.document_id for p in sample})
    rows = [{"id": pid, "split": splits[pid]} for pid in ids]
    extra = _cheap_only_sample(passages, sample, cfg.generation.cheap_passages, cfg.seed)
    if extra:
        # The generated types' sample and its splits stay exactly as without the extra passages.
        # An extra chunk of a sampled document joins that document's split, so no document
        # straddles train and test; the other extra passages are split by the same shares.
        split_of_document = {p.document_id: splits[p.id] for p in sample}
        new = [p for p in extra if p.document_id not in split_of_document]
        new_splits = split_by_passage([p.id for p in new], shares, cfg.seed,
                                      groups={p.id: p.document_id for p in new})
        for p in extra:
            split = split_of_document.get(p.document_id) or new_splits[p.id]
            splits[p.id] = split
            rows.append({"id": p.id, "split": split, "cheap_only": True})
    write_jsonl(out / "sample.jsonl", rows)
    report = dataclasses.asdict(hygiene)
    (out / "hygiene.json").write_text(json.dumps(report, indent=2))
    split_counts = {
        name: sum(1 for s in splits.values() if s == name) for name in ("train", "dev", "test")
    }
    counts = {
        "documents": len(documents),
        "passages": len(passages),
        "sampled": len(ids),
        **({"cheap_sampled": len(rows)} if extra else {}),
        **split_counts,
    }
    return counts, {"hygiene": report}


def _cheap_only_sample(
    passages: list[Passage], sample: list[Passage], cheap_passages: int | None, seed: int
) -> list[Passage]:
    """The passages only the extractive query types cover: a seeded draw from those outside
    `sample` that brings the two to `cheap_passages` (all of them when fewer), in corpus order."""
    from ml_core.passages import sample_passages

    if cheap_passages is None or cheap_passages <= len(sample):
        return []
    sampled = {p.id for p in sample}
    rest = [p for p in passages if p.id not in sampled]
    return sample_passages(rest, cheap_passages - len(sample), seed)
