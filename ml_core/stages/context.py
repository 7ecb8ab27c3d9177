"""What every stage gets: its context, the artifacts earlier stages wrote, and its error."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_core.config import RecipeConfig
from ml_core.errors import MLCoreError
from ml_core.records import Passage, ProgressFn, Query, no_progress, read_jsonl
from ml_core.registry import ModelRegistry

# What a stage returns: its counts and its metrics (both go into its manifest).
StageOutput = tuple[dict[str, Any], dict[str, Any]]


class StageError(MLCoreError, RuntimeError):
    """A stage cannot run: missing upstream output, or inputs that leave nothing to do."""

    code = "stage_failed"


@dataclass
class StageContext:
    """Everything a stage needs: where to work, what to read, and whom to tell about progress."""

    workdir: Path
    corpus_path: Path
    config: RecipeConfig
    registry: ModelRegistry
    eval_queries: Path | None = None
    eval_qrels: Path | None = None
    progress: ProgressFn = no_progress
    # The customer's own queries without judgements (BEIR queries.jsonl, e.g. from a search
    # log): trained on beside the synthetic ones, their teacher's #1 as the positive.
    train_queries: Path | None = None

    def stage_dir(self, stage: str) -> Path:
        """The folder `stage` writes its artifacts to."""
        return self.workdir / stage


def load_passages(ctx: StageContext) -> list[Passage]:
    """The prepared passages (after hygiene and chunking)."""
    return list(read_jsonl(ctx.stage_dir("prepare") / "passages.jsonl", Passage))


def load_splits(ctx: StageContext) -> dict[str, str]:
    """Sampled passage id -> "test" | "train" | "dev" (the extractive types' extra passages
    included)."""
    return {row["id"]: row["split"] for row in _sample_rows(ctx)}


def load_cheap_only(ctx: StageContext) -> set[str]:
    """Ids of the sampled passages only the extractive query types cover
    (generation.cheap_passages)."""
    return {row["id"] for row in _sample_rows(ctx) if row.get("cheap_only")}


def _sample_rows(ctx: StageContext) -> list[dict[str, Any]]:
    """prepare's sample.jsonl, its file closed once read."""
    with (ctx.stage_dir("prepare") / "sample.jsonl").open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def load_queries(path: Path) -> list[Query]:
    """The queries of a queries.jsonl that a stage wrote (generate's, or filter's kept ones)."""
    return list(read_jsonl(path, Query))

