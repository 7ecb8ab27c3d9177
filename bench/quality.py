"""Quality benchmark: the recipe's variants on the development datasets, side by side.

    python -m bench.quality [--datasets cranfield scifact-dev] [--variants l16-e8 infonce-e8]
                            [--set SECTION.KEY=JSON ...] [--out bench/results/quality.json]
    python -m bench.quality --merge A.json B.json [--compare A B] [--out ...]
                                    # one table from separate runs (one process per dataset,
                                    # or variants of one dataset run in parallel)

For each dataset it runs prepare -> generate -> filter once, then distill + evaluate once per
variant on copies of those shared stages (their fingerprints match, so they are reused, not
rerun; a variant with other candidate settings re-runs only filter, and one that differs only in
the averaging with the base re-exports without training again). The variants:

    l16-e8       the product's default recipe (lists of 16 from the fused top 16, up to 8
                 epochs, the best checkpoint averaged half and half with the base)
    infonce-e8   plain contrastive fine-tuning (the baseline the recipe warns about) on the
                 default's queries and lists, trained as long, checkpoint as trained
    supplied-e8  the default trained on the customer's own queries instead of synthetic ones:
                 the judged queries' texts (never their judgements), cross-fitted (CROSS_FIT)
    mixed-e8     the default trained on its synthetic queries plus those supplied queries,
                 cross-fitted: what a job given a query set runs
    drop-e8      the default with dropout 0.1 while the student trains
    qside-e8     the default with only the query side trained (training.tune "queries"): the
                 passages keep the base model's vectors
    pside-e8     the default with only the passage side trained ("passages"): the queries
                 keep the base model's vectors
    easy-e8      the default with 4 of each list's 16 candidates drawn from the fused ranks
                 below the other 12, down to 100 (candidates.easy_k): hard and easy, as the
                 paper's top-100 lists
    l16-raw-e8   the default's checkpoint as trained (base_merge 0; a re-export, no training)
    l16-m25-e8   the same averaged a quarter with the base (base_merge 0.25)
    anchor-e8    the default with a pull toward the base model while training
                 (training.base_anchor 10): each text's vector kept near the starting one
    anchor40-e8  the same with the pull at 40
    ce-e8        the default trained on the cross-encoder's scores alone (the paper's signal,
                 `teacher_signal: cross_encoder`): no BM25 or student ranks in the target
    oracle-e8    supplied-e8 with the dataset's judgements as the teacher and the target
                 (bench.oracle), cross-fitted: what a perfect teacher would buy on real
                 queries at this training scale; analysis only, never a default
    oracle-raw-e8  the same, the checkpoint as trained (not averaged with the base)
    oracle-anchor-e8  oracle-e8 with anchor-e8's pull toward the base while training
    oracle-easy-e8    oracle-e8 with easy-e8's lists of hard and easy candidates
    x640-e8      the default plus `extractive` queries (a seeded sentence of the passage, no
                 generator call) on 640 sampled passages, the default's 160 among them
    x1000-e8     the same on 1,000 passages
    xall-e8      the same on every passage of the corpus
    like8-e8     the default with every query written like the customer's: 8 judged queries'
                 texts (seeded, never their judgements) as generation.example_queries, one
                 like_examples query on each of 640 passages (the default's 640 prompts);
                 the 8 are left out of the evaluation, as a job leaves out its example queries

Every trained variant also records the report's set-up rows (BM25, hybrid, whole documents) with
their per-query nDCG@10, and the table pairs the hybrid with BM25 (chunks) of the tuned model
against the base's, and across variants: whether tuning helps the set-up a customer runs beside
BM25.

Beside them every table has the base (the student before tuning) and the teacher (the
cross-encoder re-ranking the base's top 20 on a seeded sample of at most 100 judged queries: the
ceiling check). A second seed is `--set seed=1` (its own passage sample, queries, split and
training); other levers are `--set` overrides, which a variant refuses where it pins the setting.

Every model is evaluated on the dataset's own judgements, which no stage trains or selects on.
The cross-fitted variants train on the texts of some judged queries: each judged query is
evaluated by a model that never saw it (its fold's), and its judgements are never read before.
Prints a table and writes JSON with per-stage wall times. Datasets are BEIR folders under
$TAILOR_DATASETS (default var/datasets). Results and adoption rules: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cross_fit import judged_queries, run_cross_fit, timed_stage
from bench.oracle import ORACLE_VARIANTS, judgements_as_teacher
from ml_core.__main__ import default_model_store
from ml_core.config import RecipeConfig, build_config
from ml_core.evaluation import paired_difference
from ml_core.pipeline import StageContext, section_hash
from ml_core.records import no_progress
from ml_core.registry import ModelRegistry
from ml_core.report import format_p, format_significance
from ml_core.stages.evaluate import SETUP_SCORES
from ml_core.training import training_run_settings

DATASETS_ROOT = Path(
    os.environ.get("TAILOR_DATASETS", Path(__file__).resolve().parents[1] / "var" / "datasets")
)
QRELS = {"cranfield": "qrels/test.tsv", "scifact-dev": "qrels/dev.tsv"}
# Each variant pins the settings it is measured with, so a change of default does not silently
# change what a name measures: the default variant is renamed instead.
MERGE_SHARE = 0.5
_LISTS = {"teacher_signal": "fused", "top_k": 16}
_TRAINING = {"list_size": 16, "max_epochs": 8, "kl_teacher_temperature": 0.05}
_GENERATED = ["questions", "claims", "keywords", "titles"]
# The variant that is the product's default recipe: the others are compared with it.
DEFAULT_VARIANT = "l16-e8"

VARIANTS: dict[str, dict[str, Any]] = {
    "l16-e8": {"training": {"loss": "listwise", "base_merge": MERGE_SHARE, **_TRAINING},
               "candidates": _LISTS},
    # InfoNCE has no teacher in its loss: the temperature is pinned only so that the loss (and
    # no averaging with the base, as other tools ship it) is all that differs from the default.
    "infonce-e8": {"training": {"loss": "infonce", "base_merge": 0.0, **_TRAINING},
                   "candidates": _LISTS},
    # The default with the embeddings and the lower half of the student's layers frozen.
    "top3-e8": {"training": {"loss": "listwise", "base_merge": MERGE_SHARE, "train_layers": 3,
                             **_TRAINING},
                "candidates": _LISTS},
    # The default with the student's dropout on while it trains (the default trains without).
    "drop-e8": {"training": {"loss": "listwise", "base_merge": MERGE_SHARE, "dropout": 0.1,
                             **_TRAINING},
                "candidates": _LISTS},
    # The default with only the query side trained: passages keep the base's vectors.
    "qside-e8": {"training": {"loss": "listwise", "base_merge": MERGE_SHARE, "tune": "queries",
                              **_TRAINING},
                 "candidates": _LISTS},
    # The default with only the passage side trained: queries keep the base's vectors.
    "pside-e8": {"training": {"loss": "listwise", "base_merge": MERGE_SHARE, "tune": "passages",
                              **_TRAINING},
                 "candidates": _LISTS},
    # The default with a quarter of each list drawn from the fused ranks 13 to 100.
    "easy-e8": {"training": {"loss": "listwise", "base_merge": MERGE_SHARE, **_TRAINING},
                "candidates": {**_LISTS, "easy_k": 4, "easy_depth": 100}},
    # The default's checkpoint as trained (no average with the base) and a quarter averaged:
    # re-exports of the default's training, no second run.
    "l16-raw-e8": {"training": {"loss": "listwise", "base_merge": 0.0, **_TRAINING},
                   "candidates": _LISTS},
    "l16-m25-e8": {"training": {"loss": "listwise", "base_merge": 0.25, **_TRAINING},
                   "candidates": _LISTS},
    # The default with a pull toward the base's vectors while it trains, as well as the
    # averaging with the base after it.
    "anchor-e8": {"training": {"loss": "listwise", "base_merge": MERGE_SHARE, "base_anchor": 10.0,
                               **_TRAINING},
                  "candidates": _LISTS},
    "anchor40-e8": {"training": {"loss": "listwise", "base_merge": MERGE_SHARE,
                                 "base_anchor": 40.0, **_TRAINING},
                    "candidates": _LISTS},
    # The default with the teacher alone as the target: nothing of BM25 in what it learns.
    "ce-e8": {"training": {"loss": "listwise", "base_merge": MERGE_SHARE, **_TRAINING},
              "candidates": {**_LISTS, "teacher_signal": "cross_encoder"}},
    # The default's generated queries, unchanged, plus extractive ones over more of the corpus.
    "x640-e8": {"generation": {"query_types": [*_GENERATED, "extractive"],
                               "cheap_passages": 640},
                "training": {"loss": "listwise", "base_merge": MERGE_SHARE, **_TRAINING},
                "candidates": _LISTS},
    "x1000-e8": {"generation": {"query_types": [*_GENERATED, "extractive"],
                                "cheap_passages": 1000},
                 "training": {"loss": "listwise", "base_merge": MERGE_SHARE, **_TRAINING},
                 "candidates": _LISTS},
    "xall-e8": {"generation": {"query_types": [*_GENERATED, "extractive"],
                               "cheap_passages": 10_000_000},
                "training": {"loss": "listwise", "base_merge": MERGE_SHARE, **_TRAINING},
                "candidates": _LISTS},
    "supplied-e8": {"generation": {"synthetic": False},
                    "training": {"loss": "listwise", "base_merge": MERGE_SHARE, **_TRAINING},
                    "candidates": _LISTS},
    "mixed-e8": {"training": {"loss": "listwise", "base_merge": MERGE_SHARE, **_TRAINING},
                 "candidates": _LISTS},
    # The judgements as teacher (bench.oracle): the grade alone is the target.
    "oracle-e8": {"generation": {"synthetic": False},
                  "training": {"loss": "listwise", "base_merge": MERGE_SHARE, **_TRAINING},
                  "candidates": {**_LISTS, "teacher_signal": "cross_encoder"}},
    # The same, the checkpoint as trained (no average with the base).
    "oracle-raw-e8": {"generation": {"synthetic": False},
                      "training": {"loss": "listwise", "base_merge": 0.0, **_TRAINING},
                      "candidates": {**_LISTS, "teacher_signal": "cross_encoder"}},
    # The same with easy-e8's lists: hard and easy candidates, the judgements scoring both.
    "oracle-easy-e8": {"generation": {"synthetic": False},
                       "training": {"loss": "listwise", "base_merge": MERGE_SHARE, **_TRAINING},
                       "candidates": {**_LISTS, "teacher_signal": "cross_encoder", "easy_k": 4,
                                      "easy_depth": 100}},
    # The same with the pull toward the base while training (anchor-e8's weight).
    "oracle-anchor-e8": {"generation": {"synthetic": False},
                         "training": {"loss": "listwise", "base_merge": MERGE_SHARE,
                                      "base_anchor": 10.0, **_TRAINING},
                         "candidates": {**_LISTS, "teacher_signal": "cross_encoder"}},
    "like8-e8": {"generation": {"query_types": ["like_examples"], "passages": 640},
                 "training": {"loss": "listwise", "base_merge": MERGE_SHARE, **_TRAINING},
                 "candidates": _LISTS},
}
# Variants given this many of the judged queries' texts as the customer's example queries
# (generation.example_queries): drawn with the seed, and left out of the evaluation by the job.
EXAMPLE_QUERIES: dict[str, int] = {"like8-e8": 8}
# Variants that train on the customer's own unjudged queries (ml_core's train_queries), with the
# judged queries standing in for a search log, cut into this many seeded folds (bench.cross_fit).
CROSS_FIT: dict[str, int] = {"supplied-e8": 2, "mixed-e8": 2, "oracle-e8": 2,
                             "oracle-raw-e8": 2, "oracle-anchor-e8": 2, "oracle-easy-e8": 2}

SHARED_STAGES = ("prepare", "generate", "filter")
# Rows every run of a dataset measures the same way (the base model, the teacher check).
_COMMON_ROWS = ("base", "teacher")


def _config(preset: str, variant: str, overrides: dict[str, Any]) -> RecipeConfig:
    merged = json.loads(json.dumps(overrides))
    for section, values in VARIANTS[variant].items():
        if not isinstance(values, dict):  # a top-level setting (the generator, the seed...)
            if section in merged and merged[section] != values:
                raise ValueError(f"--set {section} conflicts with variant {variant!r}, "
                                 f"which pins it to {values!r}")
            merged[section] = values
            continue
        for key, value in values.items():
            if key in merged.get(section, {}) and merged[section][key] != value:
                raise ValueError(f"--set {section}.{key} conflicts with variant {variant!r}, "
                                 f"which pins it to {value!r}")
        merged.setdefault(section, {}).update(values)
    return build_config(preset, merged)


def _with_examples(variant: str, overrides: dict[str, Any], queries: Path,
                   qrels: Path) -> dict[str, Any]:
    """`overrides` plus, for an EXAMPLE_QUERIES variant, that many judged queries' texts as
    generation.example_queries (a seeded draw; the judgements are not read, only which queries
    have some)."""
    if variant not in EXAMPLE_QUERIES:
        return overrides
    texts = sorted((q.id, q.text) for q in judged_queries(queries, qrels))
    seed = overrides.get("seed", RecipeConfig().seed)
    chosen = random.Random(f"{seed}:examples").sample(texts, EXAMPLE_QUERIES[variant])
    generation = {**overrides.get("generation", {}), "example_queries": [t for _, t in chosen]}
    return {**overrides, "generation": generation}


def _training_run_hash(config: RecipeConfig) -> str:
    """What a distill stage's training depends on, leaving out settings applied after it."""
    return json.dumps([training_run_settings(config.training), config.seed], sort_keys=True)


def run_dataset(
    name: str,
    preset: str,
    variants: list[str],
    workroot: Path,
    registry: ModelRegistry,
    overrides: dict[str, Any],
    on_variant: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the shared stages once and each variant's distill + evaluate; returns the rows.

    `on_variant` gets the result so far after every variant, so a long run that is stopped
    keeps the variants it finished."""
    data = DATASETS_ROOT / name
    corpus, queries, qrels = data / "corpus.jsonl", data / "queries.jsonl", data / QRELS[name]
    rows: dict[str, Any] = {}
    times: dict[str, dict[str, float]] = {}
    shared_from: dict[tuple[str, ...], Path] = {}
    trained_in: dict[tuple[Any, ...], tuple[str, Path]] = {}
    for variant in variants:
        config = _config(preset, variant, _with_examples(variant, overrides, queries, qrels))
        workdir = workroot / name / variant
        # A variant starts from a copy of the longest run of shared stages whose settings it
        # agrees on: a teacher-signal variant re-filters the same queries, nothing more.
        keys = [
            tuple(section_hash(config, stage) for stage in SHARED_STAGES[: n + 1])
            for n in range(len(SHARED_STAGES))
        ]
        for key in reversed(keys):
            if key in shared_from and not (workdir / SHARED_STAGES[len(key) - 1]).exists():
                for stage in SHARED_STAGES[: len(key)]:
                    shutil.copytree(shared_from[key] / stage, workdir / stage, dirs_exist_ok=True)
                break
        # A variant that trains exactly as an earlier one and differs only in what acts after
        # training (base_merge) starts from that run's finished training state: its distill
        # stage re-exports without training again (ml_core.pipeline keeps a valid state).
        run_key = (keys[-1], _training_run_hash(config))
        reused_training = None
        if run_key in trained_in and not (workdir / "distill").exists():
            reused_training, source = trained_in[run_key]
            for part in ("state", "best"):
                shutil.copytree(source / "distill" / part, workdir / "distill" / part)
        print(f"[{name}] {variant}" + (f" (training of {reused_training})"
                                       if reused_training else ""), flush=True)
        times[variant] = {}
        if variant in CROSS_FIT:
            with (judgements_as_teacher(queries, qrels, workdir) if variant in ORACLE_VARIANTS
                  else contextlib.nullcontext()):
                report, filtered = run_cross_fit(
                    workdir, corpus, config, registry, queries, qrels, CROSS_FIT[variant],
                    times[variant],
                )
        else:
            ctx = StageContext(workdir, corpus, config, registry, queries, qrels, no_progress)
            for stage in ("prepare", "generate", "filter", "distill", "evaluate"):
                timed_stage(stage, ctx, times[variant])
            for key in keys:
                shared_from.setdefault(key, workdir)
            trained_in.setdefault(run_key, (variant, workdir))
            report = json.loads((workdir / "evaluate" / "report.json").read_text())
            filtered = json.loads((workdir / "filter" / "manifest.json").read_text())["counts"]
        per_query = report.get("per_query") or {}
        if "base" not in rows:
            rows["base"] = dict(report["base"])
            if per_query:
                rows["base"]["per_query"] = {q: v["base"] for q, v in per_query.items()}
        rows[variant] = report["tuned"]
        rows[variant]["recommended"] = report["recommended"]
        if per_query:
            # Per-query nDCG@10 lets variants be compared pairwise, also across processes.
            rows[variant]["significance"] = report["significance"]
            rows[variant]["per_query"] = {q: v["tuned"] for q, v in per_query.items()}
        if reused_training:
            rows[variant]["training_of"] = reused_training
            rows[variant]["base_merge"] = config.training.base_merge
        rows[variant]["filter"] = filtered
        setups = _setup_rows(workdir / "evaluate", report)
        if setups:
            rows[variant]["setups"] = setups
        # The report's teacher check: the teacher re-ranking the base student's top 20 on (a
        # seeded sample of) the same judged queries, next to the student on those queries.
        check = report.get("teacher_check") or {}
        # (Not the judgements' check: the oracle re-ranking with the answers is no teacher.)
        if ("teacher" not in rows and check.get("teacher_metrics")
                and variant not in ORACLE_VARIANTS):
            rows["teacher"] = dict(
                check["teacher_metrics"],
                sampled_queries=check["queries"],
                student_on_sample=check["student"],
                depth=check["depth"],
            )
        if on_variant is not None:
            on_variant({"rows": rows, "seconds": times})
    return {"rows": rows, "seconds": times}


# The set-up rows the table pairs: the hybrid of each model with BM25 on the job's chunks.
HYBRID = {"base": "base+bm25-chunks", "tuned": "tuned+bm25-chunks"}


def _setup_rows(evaluate_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """{row id: nDCG@10, Recall@100 and per-query nDCG@10} of a job's set-up rows; empty for
    a job whose evaluate stage predates setup_scores.json."""
    scores_path = evaluate_dir / SETUP_SCORES
    retrievers = report.get("retrievers") or {}
    if not scores_path.exists() or not retrievers:
        return {}
    per_query = json.loads(scores_path.read_text())
    return {row["id"]: {"ndcg@10": row["ndcg@10"], "recall@100": row.get("recall@100"),
                        "per_query": per_query[row["id"]]}
            for row in retrievers["rows"] if row["id"] in per_query}


def _tuned_setups(rows: dict[str, Any]) -> dict[str, Any]:
    """{variant: its set-up rows} of the variants with a tuned model in the hybrid (a variant
    whose training kept the base has none)."""
    return {name: row["setups"] for name, row in rows.items()
            if HYBRID["tuned"] in row.get("setups", {})}


def setup_comparisons(rows: dict[str, Any], reference: str = DEFAULT_VARIANT,
                      pairs: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Paired nDCG@10 differences of the hybrid with BM25 (chunks): each variant's tuned model
    against the base in it, then `reference` against every other variant, then each of `pairs`
    (the same pairs as the dense rows')."""
    hybrid = _tuned_setups(rows)
    out: dict[str, Any] = {}
    for name, setups in hybrid.items():
        out[f"{name}: tuned+BM25 - base+BM25"] = paired_difference(
            setups[HYBRID["base"]]["per_query"], setups[HYBRID["tuned"]]["per_query"])
    wanted = [(reference, other) for other in hybrid if other != reference]
    wanted += [pair for pair in pairs or [] if pair not in wanted]
    for a, b in wanted:
        if a in hybrid and b in hybrid:
            out[f"{a} - {b} (tuned+BM25)"] = paired_difference(
                hybrid[b][HYBRID["tuned"]]["per_query"], hybrid[a][HYBRID["tuned"]]["per_query"])
    return out


def _difference_line(label: str, sig: dict[str, Any]) -> str:
    return (f"  {label}: {sig['difference']:+.4f} nDCG@10, {format_significance(sig)} "
            f"({sig['better']} queries better, {sig['worse']} worse)")


def print_table(results: dict[str, Any]) -> None:
    """One table per dataset: nDCG@10 and Recall@100, with gains over base."""
    for name, result in results["datasets"].items():
        rows = result["rows"]
        base = rows["base"]["ndcg@10"]
        print(f"\n{name}")
        print(f"{'system':<16}{'nDCG@10':>10}{'vs base':>10}{'R@100':>10}"
              "  vs base: 95% interval, paired p")
        # Rows in the order they were measured: a merged file may hold retired variants too.
        for system in ("base", "teacher", *(r for r in rows if r not in _COMMON_ROWS)):
            if system not in rows:
                continue
            row = rows[system]
            # The teacher is checked on a sample of queries: its gain is over the student on
            # that same sample, not over the base's score on every query.
            reference = row.get("student_on_sample", base) if system == "teacher" else base
            gain = "" if system == "base" else f"{row['ndcg@10'] - reference:+.4f}"
            recall = row.get("recall@100")
            recall_text = f"{recall:.4f}" if isinstance(recall, float) else "-"
            sig = row.get("significance")
            sure = (f"  [{sig['ci95'][0]:+.4f}, {sig['ci95'][1]:+.4f}] {format_p(sig['p_value'])}"
                    if sig else "")
            print(f"{system:<16}{row['ndcg@10']:>10.4f}{gain:>10}{recall_text:>10}{sure}")
        if "teacher" in rows:
            print(f"  teacher: re-ranks the base's top {rows['teacher'].get('depth')} on "
                  f"{rows['teacher'].get('sampled_queries')} sampled queries; 'vs base' is over "
                  f"the base on that sample ({rows['teacher'].get('student_on_sample', 0):.4f})")
        for system, row in rows.items():
            if row.get("training_of"):
                # Either side of a shared training may be the averaged one: say which this is.
                share = row.get("base_merge")
                how = ("" if share is None else f"; its checkpoint averaged with the base ({share})"
                       if share else "; its checkpoint as trained, not averaged")
                print(f"  {system}: reuses the training of {row['training_of']}{how}")
        for label, sig in result.get("comparisons", {}).items():
            print(_difference_line(label, sig))
        hybrids = _tuned_setups(rows)
        if hybrids:
            base_hybrid = next(iter(hybrids.values()))[HYBRID["base"]]["ndcg@10"]
            print(f"  hybrid with BM25 (RRF, chunks), nDCG@10: base {base_hybrid:.4f}"
                  + "".join(f", {name} {setups[HYBRID['tuned']]['ndcg@10']:.4f}"
                            for name, setups in hybrids.items()))
        for label, sig in result.get("setup_comparisons", {}).items():
            print(_difference_line(label, sig))
        for variant, stages in result["seconds"].items():
            spent = ", ".join(f"{stage} {sec:.0f}s" for stage, sec in stages.items())
            print(f"  time [{variant}]: {spent}")


def add_comparisons(
    results: dict[str, Any],
    reference: str = DEFAULT_VARIANT,
    pairs: list[tuple[str, str]] | None = None,
) -> None:
    """For each dataset: `reference` minus every other trained variant, then A minus B for
    each of `pairs` (--compare), paired over the judged queries
    (ml_core.evaluation.paired_difference), as "comparisons" {"A - B": result}. A pair is
    left out on a dataset where either side was not measured."""
    for result in results["datasets"].values():
        rows = result["rows"]
        wanted = [(reference, other) for other in rows
                  if other not in _COMMON_ROWS and other != reference]
        wanted += [pair for pair in pairs or [] if pair not in wanted]
        comparisons = {
            f"{a} - {b}": paired_difference(rows[b]["per_query"], rows[a]["per_query"])
            for a, b in wanted
            if "per_query" in rows.get(a, {}) and "per_query" in rows.get(b, {})
        }
        if comparisons:
            result["comparisons"] = comparisons
        hybrids = setup_comparisons(rows, reference, pairs)
        if hybrids:
            result["setup_comparisons"] = hybrids


def _without_per_query(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key != "per_query"}


def _same_row(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two runs' rows agree: the same keys and values, numbers to 1e-9 (a cross-fitted run
    joins its folds' means, which sums in another order)."""
    a, b = _without_per_query(a), _without_per_query(b)
    if a.keys() != b.keys():
        return False
    return all(
        math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12)
        if isinstance(a[k], float) and isinstance(b[k], float) else a[k] == b[k]
        for k in a
    )


def merge_results(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of separate processes, each run's settings kept under "runs".

    Datasets sit side by side. Runs of the same dataset (variants run in parallel on one work
    folder) join when they measured different variants and agree on the common rows; a variant
    measured twice, or a base that differs, is an error, not a silent pick."""
    merged: dict[str, Any] = {"datasets": {}, "runs": []}
    for run in runs:
        for name, result in run["datasets"].items():
            if name not in merged["datasets"]:
                merged["datasets"][name] = json.loads(json.dumps(result))
                continue
            into = merged["datasets"][name]
            for row, values in result["rows"].items():
                if row in _COMMON_ROWS and row in into["rows"]:
                    # Per-query scores are a detail runs before they existed lack.
                    kept = into["rows"][row]
                    if not _same_row(kept, values):
                        raise SystemExit(f"--merge: {name!r} runs disagree on the {row} row")
                    if "per_query" in values:
                        kept["per_query"] = values["per_query"]
                elif row in into["rows"]:
                    raise SystemExit(f"--merge: {name!r} {row} appears in more than one file")
                else:
                    into["rows"][row] = values
            for variant, stages in result["seconds"].items():
                into["seconds"].setdefault(variant, stages)
        merged["runs"].append({key: value for key, value in run.items() if key != "datasets"})
    return merged


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """--set items ("generation.passages=300", "seed=1"; values are JSON) as nested overrides."""
    overrides: dict[str, Any] = {}
    for item in items:
        dotted, sign, text = item.partition("=")
        try:
            if not (sign and dotted):
                raise ValueError("expected [SECTION.]KEY=JSON")
            value = json.loads(text)
        except ValueError as exc:  # JSONDecodeError is one
            raise ValueError(f"--set {item!r}: {exc} (strings are JSON: key='\"text\"')") from exc
        if "." in dotted:  # a section's setting
            section, key = dotted.split(".", 1)
            overrides.setdefault(section, {})[key] = value
        else:  # a top-level one: seed
            overrides[dotted] = value
    return overrides


def _gpu_name() -> str | None:
    """The CUDA device the stages run on (they pick it when there is one), else None."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--datasets", nargs="+", default=["cranfield", "scifact-dev"])
    parser.add_argument(
        "--variants", nargs="+", default=[DEFAULT_VARIANT, "infonce-e8"],
        choices=sorted(VARIANTS)
    )
    parser.add_argument("--preset", default="default")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[SECTION.]KEY=JSON",
        help="recipe override, e.g. --set generation.passages=240 or --set seed=1 "
        "(a setting the chosen variants pin is refused)",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        action="append",
        default=[],
        metavar=("A", "B"),
        help="also print A - B, paired over the judged queries (the default variant minus "
        "each other variant is always printed)",
    )
    parser.add_argument("--work", type=Path, default=Path("var/bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="combine the datasets of earlier runs' JSON files (e.g. one process per dataset) "
        "into --out and print their table; runs nothing",
    )
    args = parser.parse_args(argv)
    args.compare = [tuple(pair) for pair in args.compare]
    runs = [json.loads(path.read_text()) for path in args.merge or []]
    # Merged files may hold variants retired from VARIANTS since: their rows are comparable too.
    known = set(VARIANTS) | {row for run in runs for result in run["datasets"].values()
                             for row in result["rows"] if row not in _COMMON_ROWS}
    for pair in args.compare:
        if unknown := [name for name in pair if name not in known]:
            parser.error(f"--compare: unknown variant(s) {unknown}; choose from {sorted(known)}")
    if args.merge:
        merged = merge_results(runs)
        add_comparisons(merged, pairs=args.compare)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(merged, indent=2))
        print_table(merged)
        print(f"\nwrote {args.out}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    try:  # refuse a malformed or conflicting --set before any stage runs
        overrides = parse_overrides(args.set)
        for variant in args.variants:
            # An example-queries variant's texts are drawn per dataset; a stand-in checks it.
            stand_in = ({"generation": {**overrides.get("generation", {}),
                                        "example_queries": ["a query"]}}
                        if variant in EXAMPLE_QUERIES else {})
            _config(args.preset, variant, {**overrides, **stand_in})
    except (ValueError, KeyError) as exc:
        parser.error(str(exc))
    registry = ModelRegistry(default_model_store())
    started = time.monotonic()
    results: dict[str, Any] = {
        "preset": args.preset,
        "overrides": overrides,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "gpu": _gpu_name(),
        # Stage times come from the stage manifests; runs sharing the machine set this to 1.
        "torch_threads": os.environ.get("TAILOR_TORCH_THREADS", "all"),
        "datasets": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:

        def save_partial(result: dict[str, Any], name: str = name) -> None:
            # Partial results (finished variants) survive a later crash or a stop.
            results["datasets"][name] = result
            args.out.write_text(json.dumps(results, indent=2))

        results["datasets"][name] = run_dataset(
            name, args.preset, args.variants, args.work, registry, overrides, save_partial
        )
    results["total_seconds"] = round(time.monotonic() - started, 1)
    add_comparisons(results, pairs=args.compare)
    args.out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
