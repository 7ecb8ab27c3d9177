"""What the filter's teacher scoring costs a job, per teacher, on the pairs a job really scored.

    python -m bench.teacher_cost WORKDIR [--teachers answerai-colbert-small ms-marco-minilm-l12]
                                 [--queries 150] [--out bench/results/teacher-cost.json]

WORKDIR is a finished job folder (its prepare, generate and filter stages): the pairs are those
its filter scored (filter/teacher_scores.jsonl), as the teacher sees them. Every teacher scores
the lists of the same seeded sample of `--queries` queries (one call, so a late-interaction
teacher encodes each distinct passage of the sample once, as in a job), and the first teacher
also scores every pair of the job in one call: its cost at the job's scale, where queries share
passages more. Each gets a fresh scorer (no cached passages). Prints and writes pairs, distinct
passages, wall and CPU seconds and pairs per CPU second; run it with TAILOR_TORCH_THREADS=1 (one
thread, so CPU seconds are a single core's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from ml_core.__main__ import default_model_store
from ml_core.candidates import passage_text
from ml_core.records import Passage, Query, read_jsonl
from ml_core.registry import ModelRegistry
from ml_core.teacher import load_teacher


def job_pairs(workdir: Path) -> dict[str, list[tuple[str, str]]]:
    """{query id: its filter's (query text, passage text) pairs}, in the filter's order."""
    passages = {p.id: p for p in read_jsonl(workdir / "prepare" / "passages.jsonl", Passage)}
    queries = {q.id: q for q in read_jsonl(workdir / "generate" / "queries.jsonl", Query)}
    lists: dict[str, list[tuple[str, str]]] = {}
    with (workdir / "filter" / "teacher_scores.jsonl").open() as rows:
        for line in rows:
            row = json.loads(line)
            text = queries[row["query_id"]].text
            lists[row["query_id"]] = [(text, passage_text(passages[pid]))
                                      for pid in row["passage_ids"]]
    return lists


def time_teacher(name: str, registry: ModelRegistry,
                 pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Wall and CPU seconds, and pairs per CPU second, of a fresh `name` scoring `pairs` in one
    call. CPU time is the figure to compare on a shared machine, where wall time depends on
    the other loads."""
    teacher = load_teacher(registry.get(name), registry, device="cpu")
    started, cpu_started = time.perf_counter(), time.process_time()
    teacher.score(pairs)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    return {"teacher": name, "pairs": len(pairs),
            "distinct_passages": len({p for _, p in pairs}),
            "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
            "pairs_per_cpu_second": round(len(pairs) / max(cpu_seconds, 1e-9), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.teacher_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--teachers", nargs="+",
                        default=["answerai-colbert-small", "ms-marco-minilm-l12"])
    parser.add_argument("--queries", type=int, default=150)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", type=Path, default=Path("bench/results/teacher-cost.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    registry = ModelRegistry(default_model_store())
    lists = job_pairs(args.workdir)
    sample = sorted(random.Random(args.seed).sample(sorted(lists), min(args.queries, len(lists))))
    sampled = [pair for qid in sample for pair in lists[qid]]
    everything = [pair for pairs in lists.values() for pair in pairs]
    result: dict[str, Any] = {
        "workdir": args.workdir.name, "queries": len(lists), "sampled_queries": len(sample),
        "torch_threads": os.environ.get("TAILOR_TORCH_THREADS", "all"),
        "sample": [], "job": None,
    }
    for name in args.teachers:
        result["sample"].append(time_teacher(name, registry, sampled))
        print(result["sample"][-1], flush=True)
    result["job"] = time_teacher(args.teachers[0], registry, everything)
    print(result["job"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
