"""Generation benchmark: the in-process generator in fp32 against bf16, side by side.

    python -m bench.generate [--dataset scifact-dev] [--passages 32] [--repeats 1]
                             [--out bench/results/generate.json]

Samples passages as the pipeline's prepare stage does (the default recipe), keeps the first
`--passages` of the sample, and generates the default recipe's queries for them (every default
query type, the default prompts, batch size and temperature, retries included) with the default
generator loaded in fp32 and in bf16, alternating `--repeats` times so both see the same
machine. Prints a table (seconds, queries per second, usable queries, the speed ratio, how many
bf16 queries are word for word the fp32 ones) and writes JSON. Whether bf16's queries are as
good is a question for the whole recipe (`bench.quality`): this measures speed and drift.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import sidebyside
from ml_core.config import RecipeConfig, build_config
from ml_core.generation import TransformersGenerator, generate_queries
from ml_core.pipeline import StageContext, load_passages, load_splits, run_stage
from ml_core.registry import ModelRegistry
from ml_core.student import resolve_precision

FORMATS = ("fp32", "bf16")


def run(data: Path, passages: int, repeats: int, work: Path, registry: ModelRegistry,
        config: RecipeConfig | None = None) -> dict[str, Any]:
    """Times, usable queries and agreement of fp32 and bf16 generation on a passage sample."""
    config = config or build_config("default")
    ctx = StageContext(work, data / "corpus.jsonl", config, registry)
    run_stage("prepare", ctx)
    by_id = {p.id: p for p in load_passages(ctx)}
    sample = [by_id[pid] for pid in load_splits(ctx)][:passages]
    spec = registry.get(config.generator)
    generators = {name: TransformersGenerator.load(spec, device="cpu", precision=name)
                  for name in FORMATS}
    for generator in generators.values():  # warm up outside the timings
        generate_queries(sample[:1], config.generation.model_copy(update={"query_types":
                         config.generation.query_types[:1]}), generator, config.seed)
    seconds: dict[str, list[float]] = {name: [] for name in FORMATS}
    queries: dict[str, dict[str, str]] = {}
    for _ in range(repeats):
        for name in FORMATS:
            start = time.perf_counter()
            made = generate_queries(sample, config.generation, generators[name], config.seed)
            seconds[name].append(time.perf_counter() - start)
            queries[name] = {q.id: q.text for q in made}
    best = {name: min(times) for name, times in seconds.items()}
    requested = len(sample) * len(config.generation.query_types)
    same = sum(queries["bf16"].get(qid) == text for qid, text in queries["fp32"].items())
    return {
        "passages": len(sample),
        "requested": requested,
        "query_types": [t.value for t in config.generation.query_types],
        "seconds": seconds,
        "queries": {name: len(queries[name]) for name in FORMATS},
        "queries_per_second": {name: len(queries[name]) / best[name] for name in FORMATS},
        "speedup_bf16": best["fp32"] / best["bf16"],
        "identical": same,
        "auto_picks": resolve_precision("auto", "cpu"),
        "examples": [
            {"id": qid, "fp32": text, "bf16": queries["bf16"].get(qid)}
            for qid, text in list(queries["fp32"].items())[:8]
        ],
    }


def print_table(dataset: str, result: dict[str, Any]) -> None:
    print(f"\n{dataset}: {result['passages']} passages x {len(result['query_types'])} types = "
          f"{result['requested']} requests (auto picks {result['auto_picks']} here)")
    print(f"{'format':<8}{'best s':>10}{'queries':>10}{'queries/s':>11}")
    for name in FORMATS:
        print(f"{name:<8}{min(result['seconds'][name]):>10.1f}{result['queries'][name]:>10}"
              f"{result['queries_per_second'][name]:>11.2f}")
    print(f"bf16 speed-up {result['speedup_bf16']:.2f}x; {result['identical']} of "
          f"{result['queries']['fp32']} fp32 queries generated word for word in bf16")


def main(argv: list[str] | None = None) -> int:
    parser = sidebyside.parser(__doc__, "generate")
    parser.add_argument("--passages", type=int, default=32)
    args = parser.parse_args(argv)
    if args.passages < 1 or args.repeats < 1:
        parser.error("--passages and --repeats must be >= 1")
    result = run(sidebyside.dataset_folder(args), args.passages, args.repeats,
                 args.work / args.dataset, ModelRegistry(args.store))
    return sidebyside.finish(args, result, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
