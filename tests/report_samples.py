"""Evaluation reports for the report page's tests, made by the real ml_core build_report from
per-query scores (so they have the shape the evaluate stage writes)."""

from __future__ import annotations

import random
from typing import Any

from ml_core.config import EvaluationConfig
from ml_core.evaluation import build_report

QUERY_TYPES = ("questions", "keywords", "claims")


def _metrics(scores: dict[str, float], types: dict[str, str]) -> dict[str, Any]:
    def mean(ids: list[str]) -> dict[str, Any]:
        ndcg = sum(scores[q] for q in ids) / len(ids)
        return {"ndcg@10": ndcg, "recall@100": min(1.0, ndcg + 0.4), "mrr@10": ndcg * 0.9,
                "queries": len(ids)}

    by_type = {t: [q for q in scores if types[q] == t] for t in sorted(set(types.values()))}
    return {**mean(list(scores)), "per_query": dict(scores),
            "per_query_type": {t: mean(ids) for t, ids in by_type.items()}}


def sample_report(
    queries: int = 120, shift: float = 0.04, seed: int = 1, base_kept: bool = False
) -> dict[str, Any]:
    """A report over `queries` queries whose tuned scores move by about `shift` on average:
    some better, some worse, about a third unchanged; the recipe and models sections as the
    evaluate stage adds them."""
    rng = random.Random(seed)
    types = {f"q{i:03d}": QUERY_TYPES[i % len(QUERY_TYPES)] for i in range(queries)}
    base = {q: rng.random() for q in types}
    tuned = {}
    for q, score in base.items():
        move = 0.0 if rng.random() < 0.35 or base_kept else rng.gauss(shift, 0.12)
        tuned[q] = min(1.0, max(0.0, score + move))
    check = {"method": "judged_rerank", "metric": "ndcg@10", "queries": 50, "depth": 20,
             "teacher": 0.52, "student": 0.44}
    report = build_report(_metrics(base, types), _metrics(tuned, types), check,
                          EvaluationConfig(), "customer", base_kept=base_kept, dev_queries=40)
    report["models"] = {"student": "minilm-l6", "teacher": "minilm-ce", "generator": "qwen"}
    report["encode_precision"] = "fp32"
    report["recipe"] = {"seed": 13, "student": "minilm-l6",
                        "generation": {"query_types": list(QUERY_TYPES), "passages": 500},
                        "training": {"loss": "listwise", "max_epochs": 4, "base_merge": 0.5},
                        "evaluation": {"min_gain": 0.0}}
    return report


def sample_history(best_epoch: int = 3, epochs: int = 4) -> dict[str, Any]:
    """A distill history.json: dev loss per epoch (epoch 0 = the base), lowest at `best_epoch`."""
    rows: list[dict[str, Any]] = []
    for epoch in range(epochs + 1):
        dev = 1.0 - 0.05 * min(epoch, best_epoch) + 0.02 * max(0, epoch - best_epoch)
        row: dict[str, Any] = {"epoch": epoch, "step": 10 * epoch, "dev_loss": dev,
                               "dev_kl": dev * 0.7, "dev_infonce": dev * 3,
                               "best": epoch <= best_epoch}
        if epoch:
            row |= {"train_loss": dev - 0.1, "learning_rate": 2e-5}
        rows.append(row)
    return {"best_epoch": best_epoch, "steps": 10 * epochs, "precision": "fp32",
            "stopped_early": False, "base_merge": 0.5, "epochs": rows}
