"""Cross-fitting for the variants that train on supplied queries (bench.quality's CROSS_FIT).

The judged queries stand in for a customer's search log: they are cut into seeded folds, fold f's
model trains on the texts of the other folds' queries (never a judgement) and is evaluated on
fold f alone, and the folds' reports join into one row over every judged query. So no judged
query is graded by a model that trained on its text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ml_core.config import RecipeConfig
from ml_core.evaluation import paired_difference
from ml_core.pipeline import STAGES, StageContext, run_stage
from ml_core.records import Query, no_progress, write_jsonl
from ml_core.registry import ModelRegistry


def timed_stage(stage: str, ctx: StageContext, times: dict[str, float]) -> None:
    """Run (or reuse) a stage; its wall time is the one its manifest recorded when it ran."""
    result = run_stage(stage, ctx)
    times[stage] = round(float(result.manifest["seconds"]), 1)
    note = " (reused)" if result.skipped else ""
    print(f"  {stage:<9} {times[stage]:.0f} s{note}", flush=True)


def judged_queries(queries: Path, qrels: Path) -> list[Query]:
    """The queries that have judgements, in file order (their texts stand in for a customer's
    queries; the judgements themselves are not returned)."""
    from ml_core.corpus import read_qrels, read_queries

    judged = read_qrels(qrels)
    return [q for q in read_queries(queries) if q.id in judged]


def cross_fit_folds(query_ids: list[str], folds: int, seed: int) -> list[list[str]]:
    """The judged query ids cut into `folds` seeded folds of near-equal size (file order kept
    within a fold)."""
    order = list(query_ids)
    random.Random(seed).shuffle(order)
    fold_of = {qid: n % folds for n, qid in enumerate(order)}
    return [[qid for qid in query_ids if fold_of[qid] == f] for f in range(folds)]


def join_folds(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from the folds' reports, each over its own judged queries: every metric the
    query-weighted mean of the folds' (the metrics are means over queries, so this is the mean
    over all of them), per-query scores side by side, the paired significance over all."""
    total = sum(r["base"]["queries"] for r in reports)
    joined: dict[str, Any] = {}
    for row in ("base", "tuned"):
        joined[row] = {
            key: sum(r[row][key] * r[row]["queries"] for r in reports) / total
            for key, value in reports[0][row].items()
            if isinstance(value, float)
        }
        joined[row]["queries"] = total
    joined["per_query"] = {q: v for r in reports for q, v in r["per_query"].items()}
    joined["significance"] = {
        "metric": "ndcg@10",
        **paired_difference({q: v["base"] for q, v in joined["per_query"].items()},
                            {q: v["tuned"] for q, v in joined["per_query"].items()}),
    }
    joined["recommended"] = "/".join(r["recommended"] for r in reports)
    return joined


def run_cross_fit(
    workdir: Path,
    corpus: Path,
    config: RecipeConfig,
    registry: ModelRegistry,
    queries: Path,
    qrels: Path,
    folds: int,
    times: dict[str, float],
) -> tuple[dict[str, Any], dict[str, int]]:
    """A cross-fitted variant (CROSS_FIT): one whole run per fold under workdir/fold<f>, with
    the other folds' judged query texts as training queries and fold f as the evaluation.
    Returns the joined report and the folds' summed filter counts; `times` gets each stage's
    seconds summed over the folds."""
    texts = judged_queries(queries, qrels)
    reports, filtered = [], {}
    for f, fold in enumerate(cross_fit_folds([q.id for q in texts], folds, config.seed)):
        inside = set(fold)
        folder = workdir / f"fold{f}"
        inputs = folder / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        for file, chosen in (("train.jsonl", [q for q in texts if q.id not in inside]),
                             ("eval.jsonl", [q for q in texts if q.id in inside])):
            write_jsonl(inputs / file, ({"_id": q.id, "text": q.text} for q in chosen))
        ctx = StageContext(folder, corpus, config, registry, inputs / "eval.jsonl", qrels,
                           no_progress, train_queries=inputs / "train.jsonl")
        fold_times: dict[str, float] = {}
        for stage in STAGES:
            timed_stage(stage, ctx, fold_times)
        for stage, seconds in fold_times.items():
            times[stage] = round(times.get(stage, 0.0) + seconds, 1)
        reports.append(json.loads((folder / "evaluate" / "report.json").read_text()))
        counts = json.loads((folder / "filter" / "manifest.json").read_text())["counts"]
        for key, value in counts.items():
            filtered[key] = filtered.get(key, 0) + value
    return join_folds(reports), filtered
