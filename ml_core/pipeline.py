"""The specialization pipeline: which stage consumes which artifact, in one place.

    prepare   corpus file          -> passages.jsonl (hygiene + chunks), sample.jsonl (splits)
    generate  sample               -> queries.jsonl (synthetic queries, one per passage per type,
                                      and any the customer supplied: train_queries)
    filter    queries + passages   -> candidates.jsonl (teacher-scored lists), queries.jsonl (kept)
    distill   candidates + queries -> model/ (sentence-transformers folder), history.json
    evaluate  model + test queries -> report.json (base vs tuned, teacher check, recommendation)

Each stage is a function of a StageContext (`ml_core.stages`) that writes only under
`workdir/<stage>/`. `run_stage` runs it unless its manifest (`ml_core.manifest`) says it already
finished with the same settings and inputs.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml_core.config import RecipeConfig
from ml_core.manifest import (
    MANIFEST,
    STARTED_FOR,
    fingerprint,
    read_manifest,
    settings_hash,
    write_manifest,
)
from ml_core.records import ProgressFn
from ml_core.stages import distill, evaluate, generate, prepare
from ml_core.stages import filter as filter_stage
from ml_core.stages.context import (
    StageContext,
    StageError,
    StageOutput,
    load_passages,
    load_splits,
)
from ml_core.stages.generate import read_supplied_queries


@dataclass(frozen=True)
class Stage:
    """One stage's place in the pipeline: what it runs and everything its fingerprint covers."""

    run: Callable[[StageContext, Path], StageOutput]
    # The stages whose artifacts it reads.
    consumes: tuple[str, ...]
    # The recipe sections (or "section.field"s) it reads.
    settings: tuple[str, ...]
    # The job's own files it reads, by name (None: the job has no such file).
    files: Callable[[StageContext], dict[str, Path | None]] = lambda ctx: {}
    # Outputs kept when it runs again, because they check their own inputs.
    keeps: tuple[str, ...] = ()


PIPELINE: dict[str, Stage] = {
    # Prepare reads single fields of later sections: naming the whole sections would make a
    # change of, say, the learning rate regenerate every query.
    "prepare": Stage(
        prepare.run,
        consumes=(),
        settings=(
            "seed",
            "student",
            "corpus",
            "generation.passages",
            "generation.cheap_passages",
            "training.max_passage_length",
            "training.dev_fraction",
            "evaluation.test_fraction",
        ),
        files=lambda ctx: {"corpus": ctx.corpus_path},
    ),
    "generate": Stage(
        generate.run,
        consumes=("prepare",),
        settings=("seed", "generator", "generation"),
        # Named only when given, so jobs without supplied queries keep their fingerprints.
        files=lambda ctx: {"train_queries": ctx.train_queries} if ctx.train_queries else {},
    ),
    "filter": Stage(
        filter_stage.run,
        consumes=("prepare", "generate"),
        settings=("seed", "student", "teacher", "encode_precision", "candidates"),
    ),
    # Training resumes a saved state only for the same starting weights, settings and data
    # (ml_core.training), so keeping it lets a crashed run resume mid-way and a change of what
    # acts after training (training.AFTER_TRAINING) re-export without training again. The
    # worker mirrors exactly these folders.
    "distill": Stage(
        distill.run,
        consumes=("prepare", "filter"),
        settings=("seed", "training"),
        keeps=("state", "best", "best.old"),
    ),
    "evaluate": Stage(
        evaluate.run,
        consumes=("prepare", "generate", "filter", "distill"),
        settings=("encode_precision", "evaluation"),
        files=lambda ctx: {"eval_queries": ctx.eval_queries, "eval_qrels": ctx.eval_qrels},
    ),
}
STAGES: tuple[str, ...] = tuple(PIPELINE)
# The recipe settings each stage reads, by stage name.
_STAGE_SECTIONS: dict[str, tuple[str, ...]] = {name: s.settings for name, s in PIPELINE.items()}


@dataclass
class StageResult:
    """What a stage did: its manifest, and whether it was skipped as already finished."""

    stage: str
    skipped: bool
    manifest: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


def section_hash(config: RecipeConfig, stage: str) -> str:
    """sha256 of the recipe settings `stage` itself reads (its manifest's config_hash)."""
    return settings_hash(config, PIPELINE[stage].settings)


def stage_fingerprint(stage: str, ctx: StageContext) -> str:
    """The hash that decides whether a finished stage can be reused (ml_core.manifest);
    StageError when a stage it consumes has not finished."""
    upstream = {}
    for name in PIPELINE[stage].consumes:
        manifest = read_manifest(ctx.stage_dir(name))
        if manifest is None:
            raise StageError(f"stage {stage!r} needs stage {name!r} to finish first")
        upstream[name] = manifest["fingerprint"]
    config_hash = section_hash(ctx.config, stage)
    return fingerprint(stage, config_hash, upstream, PIPELINE[stage].files(ctx))


def is_finished(stage: str, ctx: StageContext) -> bool:
    """True when the stage's manifest matches the current config and upstream outputs."""
    manifest = read_manifest(ctx.stage_dir(stage))
    if manifest is None:
        return False
    try:
        return manifest["fingerprint"] == stage_fingerprint(stage, ctx)
    except StageError:
        return False


def run_stage(stage: str, ctx: StageContext) -> StageResult:
    """Run one stage unless its manifest says it already finished with the same inputs."""
    if stage not in PIPELINE:
        raise KeyError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    wiring = PIPELINE[stage]
    fingerprint = stage_fingerprint(stage, ctx)
    out = ctx.stage_dir(stage)
    manifest = read_manifest(out)
    if manifest is not None and manifest["fingerprint"] == fingerprint:
        ctx.progress(1.0, f"{stage}: already finished, skipped")
        return StageResult(stage, True, manifest, manifest.get("metrics", {}))
    # A half-written or outdated stage folder is discarded, except what checks its own inputs.
    if out.exists():
        for child in out.iterdir():
            if child.name in wiring.keeps:
                continue
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / STARTED_FOR).write_text(fingerprint)
    started = time.monotonic()
    counts, metrics = wiring.run(ctx, out)
    manifest = {
        "stage": stage,
        "fingerprint": fingerprint,
        "config_hash": section_hash(ctx.config, stage),
        "inputs": {
            name: read_manifest(ctx.stage_dir(name))["fingerprint"]  # type: ignore[index]
            for name in wiring.consumes
        },
        "counts": counts,
        "metrics": metrics,
        "seconds": round(time.monotonic() - started, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_manifest(out, manifest)
    ctx.progress(1.0, f"{stage}: done")
    return StageResult(stage, False, manifest, metrics)


def run_all(
    ctx: StageContext, on_stage: Callable[[str], ProgressFn] | None = None
) -> list[StageResult]:
    """Run every stage in order; `on_stage(name)` may supply a per-stage progress callback."""
    results = []
    for stage in STAGES:
        stage_ctx = ctx if on_stage is None else dataclasses.replace(ctx, progress=on_stage(stage))
        results.append(run_stage(stage, stage_ctx))
    return results


__all__ = [
    "MANIFEST",
    "PIPELINE",
    "STAGES",
    "Stage",
    "StageContext",
    "StageError",
    "StageResult",
    "is_finished",
    "load_passages",
    "load_splits",
    "read_manifest",
    "read_supplied_queries",
    "run_all",
    "run_stage",
    "section_hash",
    "stage_fingerprint",
]
