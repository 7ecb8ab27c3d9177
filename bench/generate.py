"""Generation benchmark: two in-process generators side by side on the same requests.

    python -m bench.generate [--dataset scifact-dev] [--passages 32] [--repeats 1]
                             [--compare precision|sampler] [--out bench/results/generate.json]

Samples passages as the pipeline's prepare stage does (the default recipe), keeps the first
`--passages` of the sample, and generates the default recipe's queries for them (every default
query type, the default prompts, batch size and temperature, retries included) with two
generators, alternating `--repeats` times so both see the same machine:

- `precision` (the default): the default generator loaded in fp32 against bf16;
- `sampler`: fp32 with the product's sampling (transformers' own, torch.multinomial) against an
  inverse-CDF sampler (InverseCdfSampler below), which draws from the same distribution.

Prints a table (seconds, queries per second, usable queries, the speed ratio, how many of the
second generator's queries are word for word the first's) and writes JSON. Whether the queries
are as good is a question for the whole recipe (`bench.quality`): this measures speed and drift.
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

# Each comparison's two arms: the reference first.
COMPARISONS = {"precision": ("fp32", "bf16"), "sampler": ("multinomial", "inverse-cdf")}


class InverseCdfSampler:
    """A logits processor that draws each row's next token from softmax(scores / temperature).

    It returns scores that are 0 at the drawn token and -inf elsewhere, so greedy decoding picks
    the draw. The draw is an inverse-CDF lookup (a cumulative sum and a binary search, in float64)
    on torch's seeded generator: the same distribution as transformers' sampling, which calls
    torch.multinomial (~37 times slower per call on a CPU over a 49k-token vocabulary). A token
    of probability 0 is never drawn. Measured as a candidate, not adopted (docs/benchmarks.md,
    "Sampling by inverse CDF").
    """

    def __init__(self, temperature: float) -> None:
        if temperature <= 0:
            raise ValueError("temperature must be > 0 to sample")
        self.temperature = temperature

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(scores.double() / self.temperature, dim=-1)
        cumulative = probs.cumsum(dim=-1)
        # u in [0, total): the first index whose cumulative sum exceeds u; a zero-probability
        # token repeats its left neighbour's sum, so it is never the first to exceed it.
        draws = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device)
        tokens = torch.searchsorted(cumulative, draws * cumulative[:, -1:], right=True)
        tokens = tokens.clamp_max(probs.shape[-1] - 1)
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(1, tokens, 0.0)


class InverseCdfGenerator(TransformersGenerator):
    """The product's generator with InverseCdfSampler in place of transformers' sampling."""

    def sampling(self, temperature: float) -> dict[str, Any]:
        if temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": False, "logits_processor": [InverseCdfSampler(temperature)]}


def _generators(compare: str, spec: Any) -> dict[str, TransformersGenerator]:
    if compare == "precision":
        return {name: TransformersGenerator.load(spec, device="cpu", precision=name)
                for name in COMPARISONS["precision"]}
    plain = TransformersGenerator.load(spec, device="cpu", precision="fp32")
    return {"multinomial": plain,
            "inverse-cdf": InverseCdfGenerator(plain.model, plain.tokenizer, "cpu")}


def run(data: Path, passages: int, repeats: int, work: Path, registry: ModelRegistry,
        config: RecipeConfig | None = None, compare: str = "precision") -> dict[str, Any]:
    """Times, usable queries and agreement of two generators on a passage sample."""
    config = config or build_config("default")
    arms = COMPARISONS[compare]
    ctx = StageContext(work, data / "corpus.jsonl", config, registry)
    run_stage("prepare", ctx)
    by_id = {p.id: p for p in load_passages(ctx)}
    sample = [by_id[pid] for pid in load_splits(ctx)][:passages]
    generators = _generators(compare, registry.get(config.generator))
    for generator in generators.values():  # warm up outside the timings
        generate_queries(sample[:1], config.generation.model_copy(update={"query_types":
                         config.generation.query_types[:1]}), generator, config.seed)
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    queries: dict[str, dict[str, str]] = {}
    for _ in range(repeats):
        for name in arms:
            start = time.perf_counter()
            made = generate_queries(sample, config.generation, generators[name], config.seed)
            seconds[name].append(time.perf_counter() - start)
            queries[name] = {q.id: q.text for q in made}
    best = {name: min(times) for name, times in seconds.items()}
    reference, other = arms
    requested = len(sample) * len(config.generation.query_types)
    same = sum(queries[other].get(qid) == text for qid, text in queries[reference].items())
    return {
        "compare": compare,
        "arms": list(arms),
        "passages": len(sample),
        "requested": requested,
        "query_types": [t.value for t in config.generation.query_types],
        "seconds": seconds,
        "queries": {name: len(queries[name]) for name in arms},
        "queries_per_second": {name: len(queries[name]) / best[name] for name in arms},
        "speedup": best[reference] / best[other],
        "identical": same,
        "auto_picks": resolve_precision("auto", "cpu"),
        "examples": [
            {"id": qid, reference: text, other: queries[other].get(qid)}
            for qid, text in list(queries[reference].items())[:8]
        ],
    }


def print_table(dataset: str, result: dict[str, Any]) -> None:
    reference, other = result["arms"]
    print(f"\n{dataset}: {result['passages']} passages x {len(result['query_types'])} types = "
          f"{result['requested']} requests (auto picks {result['auto_picks']} here)")
    print(f"{result['compare']:<13}{'best s':>10}{'queries':>10}{'queries/s':>11}")
    for name in result["arms"]:
        print(f"{name:<13}{min(result['seconds'][name]):>10.1f}{result['queries'][name]:>10}"
              f"{result['queries_per_second'][name]:>11.2f}")
    print(f"{other} speed-up {result['speedup']:.2f}x; {result['identical']} of "
          f"{result['queries'][reference]} {reference} queries generated word for word by {other}")


def main(argv: list[str] | None = None) -> int:
    parser = sidebyside.parser(__doc__, "generate")
    parser.add_argument("--passages", type=int, default=32)
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="precision")
    args = parser.parse_args(argv)
    if args.passages < 1 or args.repeats < 1:
        parser.error("--passages and --repeats must be >= 1")
    result = run(sidebyside.dataset_folder(args), args.passages, args.repeats,
                 args.work / args.dataset, ModelRegistry(args.store), compare=args.compare)
    return sidebyside.finish(args, result, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
