"""Training benchmark: the student's training in fp32 against bf16, side by side.

    python -m bench.train [--dataset scifact-dev] [--queries 96] [--repeats 1]
                          [--out bench/results/train.json]

Chunks the dataset's corpus as the pipeline's prepare stage does (the default recipe), draws a
seeded sample of chunks and makes one training list per sampled chunk: a pseudo-query (the
chunk's first words), the chunk as the positive and `list_size - 1` other sampled chunks with
seeded teacher scores below the positive's. Then runs one epoch of `train_student` with the
default recipe's training settings (batch, micro-batch, lengths, gradient cache, dev loss before
and after the epoch, checkpoint export) in fp32 and in bf16, alternating `--repeats` times so
both see the same machine. Prints a table and writes JSON: seconds, optimizer steps per minute,
the speed ratio, the dev loss each format reached and how far the bf16 weights end from the
fp32 ones. The lists are for timing, not for learning anything useful: whether bf16 trains as
well is a question for the whole recipe (`bench.quality`).
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from bench import sidebyside
from ml_core.config import RecipeConfig, build_config
from ml_core.pipeline import StageContext, load_passages, run_stage
from ml_core.records import Query, ScoredList
from ml_core.registry import ModelRegistry
from ml_core.student import Student, resolve_precision
from ml_core.training import STATE_FILE, train_student

FORMATS = ("fp32", "bf16")
DEV_LISTS = 8


def pseudo_lists(passage_ids: list[str], texts: dict[str, str], list_size: int,
                 seed: int) -> tuple[list[ScoredList], dict[str, Query]]:
    """One list per passage: a query of its first 12 words, the passage first, then others."""
    rng = random.Random(seed)
    lists, queries = [], {}
    for i, pid in enumerate(passage_ids):
        qid = f"q{i}"
        queries[qid] = Query(qid, " ".join(texts[pid].split()[:12]))
        others = rng.sample([p for p in passage_ids if p != pid], list_size - 1)
        scores = [1.0] + sorted((rng.uniform(0.0, 0.8) for _ in others), reverse=True)
        lists.append(ScoredList(qid, [pid, *others], scores))
    return lists, queries


def run(data: Path, queries: int, repeats: int, work: Path, registry: ModelRegistry,
        config: RecipeConfig | None = None) -> dict[str, Any]:
    """Times and outcomes of one training epoch in fp32 and in bf16 on the same lists."""
    config = config or build_config("default")
    cfg = config.training
    ctx = StageContext(work, data / "corpus.jsonl", config, registry)
    run_stage("prepare", ctx)
    passages = {p.id: p for p in load_passages(ctx)}
    count = queries + DEV_LISTS
    if count < cfg.list_size or count > len(passages):
        raise ValueError(f"need between {cfg.list_size} and {len(passages)} lists, not {count}")
    sample = random.Random(config.seed).sample(sorted(passages), count)
    lists, query_map = pseudo_lists(sample, {pid: passages[pid].text for pid in sample},
                                    cfg.list_size, config.seed)
    train, dev = lists[DEV_LISTS:], lists[:DEV_LISTS]
    seconds: dict[str, list[float]] = {name: [] for name in FORMATS}
    outcome: dict[str, dict[str, Any]] = {}
    for _ in range(repeats):
        for name in FORMATS:
            out = work / "train" / name
            shutil.rmtree(out, ignore_errors=True)  # a kept state would be resumed, not timed
            student = Student.load(registry.path(config.student))
            settings = cfg.model_copy(update={"precision": name, "max_epochs": 1})
            start = time.perf_counter()
            result = train_student(student, train, dev, passages, query_map, settings, out,
                                   config.seed)
            seconds[name].append(time.perf_counter() - start)
            state = torch.load(out / "state" / STATE_FILE, map_location="cpu", weights_only=True)
            outcome[name] = {"steps": result.steps, "model": state["model"],
                             "dev_loss": [entry["dev_loss"] for entry in result.history]}
    best = {name: min(times) for name, times in seconds.items()}
    fp32, bf16 = outcome["fp32"]["model"], outcome["bf16"]["model"]
    start_weights = Student.load(registry.path(config.student)).state_dict()
    moved = max((fp32[k] - start_weights[k]).abs().max().item() for k in fp32)
    apart = max((fp32[k] - bf16[k]).abs().max().item() for k in fp32)
    steps = outcome["fp32"]["steps"]
    return {
        "queries": len(train),
        "list_size": cfg.list_size,
        "batch_size": cfg.batch_size,
        "steps": steps,
        "seconds": seconds,
        "steps_per_minute": {name: 60 * steps / best[name] for name in FORMATS},
        "speedup_bf16": best["fp32"] / best["bf16"],
        "dev_loss": {name: outcome[name]["dev_loss"] for name in FORMATS},
        "fp32_weights_moved": moved,
        "bf16_from_fp32": apart,
        "auto_picks": resolve_precision("auto", "cpu"),
    }


def print_table(dataset: str, result: dict[str, Any]) -> None:
    print(f"\n{dataset}: one epoch of {result['queries']} lists of {result['list_size']}, "
          f"{result['steps']} steps of {result['batch_size']} (auto picks {result['auto_picks']} "
          "here)")
    print(f"{'format':<8}{'best s':>10}{'steps/min':>11}{'dev loss before -> after':>28}")
    for name in FORMATS:
        before, *_, after = result["dev_loss"][name]
        print(f"{name:<8}{min(result['seconds'][name]):>10.1f}"
              f"{result['steps_per_minute'][name]:>11.2f}{before:>16.4f} -> {after:.4f}")
    print(f"bf16 speed-up {result['speedup_bf16']:.2f}x; largest weight change in fp32 "
          f"{result['fp32_weights_moved']:.2e}, bf16 weights from fp32 "
          f"{result['bf16_from_fp32']:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = sidebyside.parser(__doc__, "train")
    parser.add_argument("--queries", type=int, default=96, help="training lists (one epoch)")
    args = parser.parse_args(argv)
    if args.queries < 1 or args.repeats < 1:
        parser.error("--queries and --repeats must be >= 1")
    result = run(sidebyside.dataset_folder(args), args.queries, args.repeats,
                 args.work / args.dataset, ModelRegistry(args.store))
    return sidebyside.finish(args, result, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
