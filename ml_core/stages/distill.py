"""Distill: candidates + queries -> model/ (the tuned sentence-transformers folder) and
history.json (dev loss per epoch, the best epoch)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from ml_core.records import Query, ScoredList, read_jsonl
from ml_core.stages.context import (
    StageContext,
    StageError,
    StageOutput,
    load_passages,
    load_queries,
    load_splits,
)


def run(ctx: StageContext, out: Path) -> StageOutput:
    """Train the student on the teacher's lists and export the best checkpoint (averaged with
    the base by training.base_merge); returns (query and step counts, {best_epoch})."""
    from ml_core.student import Student
    from ml_core.training import CONFIG_FILE, average_with_base, train_student

    cfg = ctx.config
    passages = {p.id: p for p in load_passages(ctx)}
    queries = _split_supplied(ctx, load_queries(ctx.stage_dir("generate") / "queries.jsonl"))
    train_lists, dev_lists = _training_lists(ctx, queries)
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


def _split_supplied(ctx: StageContext, queries: list[Query]) -> dict[str, Query]:
    """Queries by id, the supplied ones (no source passage to split by) split by themselves,
    seeded, into train and dev."""
    from ml_core.candidates import split_by_passage

    by_id = {q.id: q for q in queries}
    supplied = [qid for qid, q in by_id.items() if not q.source_id]
    dev = ctx.config.training.dev_fraction
    seed = ctx.config.seed
    for qid, split in split_by_passage(supplied, {"train": 1 - dev, "dev": dev}, seed).items():
        by_id[qid] = dataclasses.replace(by_id[qid], split=split)
    return by_id


def _training_lists(
    ctx: StageContext, queries: dict[str, Query]
) -> tuple[list[ScoredList], list[ScoredList]]:
    """The filter's lists of train and dev queries, with every test passage taken out."""
    test_ids = {pid for pid, split in load_splits(ctx).items() if split == "test"}
    scored_lists = list(read_jsonl(ctx.stage_dir("filter") / "candidates.jsonl", ScoredList))
    relabeled = ctx.stage_dir("filter") / "relabeled.jsonl"
    if ctx.config.training.relabel_disagreements:
        if not relabeled.exists():
            raise StageError("filter output has no relabeled.jsonl (an older run): re-run filter")
        # Training lists only: dev loss (model selection) stays on round-trip-consistent queries.
        scored_lists += [
            scored
            for scored in read_jsonl(relabeled, ScoredList)
            if queries[scored.query_id].split == "train" and scored.passage_ids[0] not in test_ids
        ]
    train_lists: list[ScoredList] = []
    dev_lists: list[ScoredList] = []
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
    return train_lists, dev_lists
