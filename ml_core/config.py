"""Recipe configuration: the one typed description of a specialization run.

Shared by ml_core (which runs it), the worker (which stores it with a job) and the app (which
validates a customer's job spec against it). Defaults follow ../shared/docs/recipe.md, scaled to
what a CPU machine can do; the paper's GPU-scale values are noted where they differ.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class QueryType(StrEnum):
    """The six synthetic query types of the recipe (Tamber et al. 2025, section 3), which the
    generator writes, and one extractive type that needs no generator."""

    QUESTIONS = "questions"
    CLAIMS = "claims"
    TITLES = "titles"
    KEYWORDS = "keywords"
    ZERO_SHOT_USER = "zero_shot_user"
    FEW_SHOT_USER = "few_shot_user"
    # The passage's own title from the corpus, as is (one query per titled document).
    SOURCE_TITLES = "source_titles"


ALL_QUERY_TYPES: tuple[QueryType, ...] = tuple(QueryType)
EXTRACTIVE_QUERY_TYPES: frozenset[QueryType] = frozenset({QueryType.SOURCE_TITLES})
# The types an instruction LLM writes, each with its prompt.
LLM_QUERY_TYPES: tuple[QueryType, ...] = tuple(
    t for t in QueryType if t not in EXTRACTIVE_QUERY_TYPES)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorpusConfig(_Section):
    """Corpus hygiene and chunking."""

    min_chars: Annotated[int, Field(ge=0, le=1000)] = 10
    dedupe: bool = True
    # Passages longer than the student's passage length are split into overlapping chunks that
    # keep their parent id, so evaluation maps chunks back to documents.
    chunk_overlap_tokens: Annotated[int, Field(ge=0, le=256)] = 32
    max_chars: Annotated[int, Field(ge=64, le=100_000)] = 2048


class GenerationConfig(_Section):
    """Synthetic query generation."""

    # The recipe's mix, cut to the four types that fit a 2-core budget (paper: all six; the two
    # user-query types can be added per job).
    query_types: Annotated[list[QueryType], Field(min_length=1)] = [
        QueryType.QUESTIONS,
        QueryType.CLAIMS,
        QueryType.KEYWORDS,
        QueryType.TITLES,
    ]
    # Passages sampled for generation (paper: up to 100k). One query per passage per type. The
    # default is sized so a whole run on a 5,000-passage corpus fits an hour on 2 CPU cores;
    # raise it on a GPU worker.
    passages: Annotated[int, Field(ge=1, le=1_000_000)] = 160
    # Off: no synthetic queries; the job trains on the queries it is given (the customer's own
    # unlabelled queries, e.g. a search log; StageContext.train_queries) and nothing else.
    synthetic: bool = True
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    # For backend="openai": any OpenAI-compatible completions endpoint (vLLM server, hosted API).
    endpoint: str | None = None
    api_key_env: str = "TAILOR_GENERATOR_API_KEY"
    # The paper samples Llama-3.1-8B at 0.8. The CPU default generator (SmolLM2-135M) invents
    # text at 0.8 and stays on topic at 0.3 (measured on Cranfield: source passage in BM25's
    # top 10 for 58/96 queries at 0.3); raise it for a large generator.
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.3
    max_new_tokens: Annotated[int, Field(ge=4, le=256)] = 32
    few_shot_examples: Annotated[int, Field(ge=0, le=8)] = 3
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    # The number format of the in-process generator (backend "transformers"; vLLM picks its
    # own): "auto" is bf16 where the hardware computes it natively (CPUs with AVX512-BF16 or
    # AMX, CUDA GPUs with bf16), fp32 elsewhere. bf16 changes the sampled text a little; it
    # generated 1.67x faster here (`python -m bench.generate`, docs/benchmarks.md).
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    @model_validator(mode="after")
    def _endpoint_for_openai(self) -> GenerationConfig:
        if self.backend == "openai" and not self.endpoint:
            raise ValueError("generation.endpoint is required when generation.backend is 'openai'")
        return self


class CandidateConfig(_Section):
    """First-stage candidates, teacher scoring and the round-trip filter."""

    # Candidates per query from the fused first stage (paper: 100). The teacher scores these,
    # so this is the main CPU cost knob. 16 (with lists of 16) since 2026-12-04: see list_size.
    top_k: Annotated[int, Field(ge=2, le=1000)] = 16
    use_bm25: bool = True
    rrf_k: Annotated[int, Field(ge=1, le=1000)] = 60
    # Round-trip filter: the source passage must be the teacher's #1 and in the student's top N.
    round_trip: bool = True
    student_top_n: Annotated[int, Field(ge=1, le=1000)] = 20
    # What the round trip must find. "passage" (the paper, whose documents are one passage each):
    # the source passage itself. "document": any chunk of the source's document. In a chunked
    # corpus the teacher's #1 is often another chunk of the same document (a third of the
    # generated queries on both development datasets, docs/benchmarks.md), which "passage" drops;
    # "document" keeps such a query with the teacher's best chunk of the document as its positive,
    # and the student check passes when any chunk of the document is in the student's top N.
    # Measured (seed 13, against "passage" on the same queries): Cranfield -0.0031, SciFact dev
    # -0.0010 nDCG@10, both inside the noise, so "passage" stays the default (docs/benchmarks.md).
    round_trip_scope: Literal["passage", "document"] = "passage"
    # Drop queries whose best teacher score is under this percentile of all best scores.
    min_score_percentile: Annotated[float, Field(ge=0.0, le=99.0)] = 25.0
    # Teacher scores are min-max normalised between these percentiles and clipped to [0, 1].
    norm_low_percentile: Annotated[float, Field(ge=0.0, le=50.0)] = 1.0
    norm_high_percentile: Annotated[float, Field(ge=50.0, le=100.0)] = 99.0
    # "fused": the teacher's normalised scores blended with reciprocal-rank evidence from BM25
    # and the student, so that where the cross-encoder alone is no better than the student
    # (Cranfield, see docs/models.md) the first stage's agreement still counts. "cross_encoder":
    # the teacher's scores as they are (the paper). Fused measured better on both development
    # datasets: Cranfield +0.0072, SciFact dev +0.0034 nDCG@10 over cross_encoder
    # (docs/benchmarks.md).
    teacher_signal: Literal["cross_encoder", "fused"] = "fused"
    fused_teacher_weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    teacher_batch_size: Annotated[int, Field(ge=1, le=1024)] = 32
    # Two-round scoring for long lists: the teacher first scores every query's fused top
    # filter_depth (plus its source); only the queries the round trip keeps there get the rest
    # of their top_k scored. The teacher is the CPU bottleneck and most queries are dropped:
    # lists of 32 at depth 16 filtered in 1.11x (SciFact dev) and 1.29x (Cranfield) the time
    # of one round over 16 (docs/benchmarks.md, stop 28). None: one round over top_k.
    filter_depth: Annotated[int | None, Field(ge=2, le=1000)] = None
    # Helper retrievers: other bi-encoders of the model registry (role student) whose dense
    # top_k lists join the reciprocal-rank fusion beside the student's and BM25's. They widen
    # the candidate pool and vote in the fused teacher signal; they are never trained, and the
    # filter stage encodes the corpus once with each. A helper that is the student is skipped.
    helpers: list[str] = []

    @model_validator(mode="after")
    def _depth_within_top_k(self) -> CandidateConfig:
        if self.filter_depth is not None and self.filter_depth > self.top_k:
            raise ValueError(f"candidates.filter_depth ({self.filter_depth}) must not exceed "
                             f"candidates.top_k ({self.top_k})")
        return self

    @field_validator("helpers")
    @classmethod
    def _distinct_helpers(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"helpers are named more than once: {value}")
        return value


class TrainingConfig(_Section):
    """Student training: listwise distillation + a small InfoNCE term (or the InfoNCE baseline)."""

    loss: Literal["listwise", "infonce"] = "listwise"
    # Passages per query list: the positive + (list_size - 1) candidates (paper: 20). Lists of
    # 16 from the fused top 16 beat 8 of 12 under two seeds on both development datasets
    # (seed 1: SciFact dev +0.0039 nDCG@10, 95% interval [+0.0010, +0.0071]; Cranfield +0.0021,
    # inside the noise); with bf16 training the whole SciFact dev run takes 35.8 min on 2 cores.
    list_size: Annotated[int, Field(ge=2, le=128)] = 16
    # Queries per optimizer step, and per gradient-cache chunk (memory is set by the chunk; a
    # batch that is one chunk skips the cache's extra forward pass). Paper: 4,096 in chunks of 16.
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 32
    micro_batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    # Paper: 2e-4 at 4,096 queries per step. On a few hundred synthetic queries, 1e-4 fits them
    # and the checkpoint as trained fell below its base (SciFact dev -0.0146 nDCG@10, p 0.047;
    # Cranfield -0.0027), level with 2e-5 once averaged with the base (docs/benchmarks.md).
    learning_rate: Annotated[float, Field(gt=0.0, le=1e-2)] = 2e-5
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    warmup_epochs: Annotated[float, Field(ge=0.0, le=10.0)] = 0.5
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    grad_clip: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    # A cap: early stopping on the dev loss (patience) ends training before it (paper: up to
    # 30). At 4 the default stopped at the cap with its dev loss still falling; up to 8 it
    # stopped after 6 (Cranfield) and 5 (SciFact dev) epochs, best at 4 and 3, and scored
    # +0.0007 and +0.0008 nDCG@10 over the cap of 4 on the same lists (inside the noise;
    # the adoption rule asked for a positive difference on both), with 1.2-1.4x the training
    # time (docs/benchmarks.md).
    max_epochs: Annotated[int, Field(ge=1, le=100)] = 8
    patience: Annotated[int, Field(ge=1, le=100)] = 2
    kl_student_temperature: Annotated[float, Field(gt=0.0, le=10.0)] = 0.05
    # The paper uses 0.3 on lists drawn from the top 100, where normalised teacher scores spread
    # over [0, 1]. Our lists are the top few hard candidates, whose scores sit close together:
    # 0.3 makes the target nearly flat and pulls hard negatives toward the query (measured on
    # Cranfield -0.0162 -> +0.0006 nDCG@10, SciFact dev -0.0264 -> -0.0097; docs/benchmarks.md).
    # 0.1 -> 0.05, averaged with the base (base_merge 0.5): Cranfield +0.0003 (level), SciFact
    # dev +0.0047 (95% interval [+0.0004, +0.0089]), the first setting above its base on both.
    kl_teacher_temperature: Annotated[float, Field(gt=0.0, le=10.0)] = 0.05
    infonce_temperature: Annotated[float, Field(gt=0.0, le=10.0)] = 0.01
    infonce_weight: Annotated[float, Field(ge=0.0, le=10.0)] = 0.1
    false_negative_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.6
    max_query_length: Annotated[int, Field(ge=8, le=512)] = 64
    max_passage_length: Annotated[int, Field(ge=16, le=8192)] = 128
    dev_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1
    # The number format the student's forward and backward passes compute in (bf16 autocast;
    # the weights, the optimizer and the loss stay float32): "auto" is bf16 where the hardware
    # computes it natively (CPUs with AVX512-BF16 or AMX, CUDA GPUs with bf16; the recipe
    # trains in bf16 on GPU), fp32 elsewhere. One epoch on 96 SciFact lists took 84.9 s in bf16
    # against 151.2 s in fp32, 1.78x, to the same dev loss (`python -m bench.train`, one core).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Also train on queries the round-trip filter dropped only because the teacher signal ranked
    # another passage first, with that passage as the positive (the recipe drops them). Helps
    # only where the teacher beats the student: SciFact dev -0.0063 -> -0.0009 nDCG@10 vs base,
    # Cranfield +0.0078 -> -0.0017 (docs/benchmarks.md), so it is off by default.
    relabel_disagreements: bool = False
    # Weight-space ensembling with the base (WiSE-FT, arXiv 2109.01903): the exported model is
    # (1 - base_merge) x the best checkpoint + base_merge x the base model. Fine-tuning on a few
    # hundred synthetic queries fits them (dev loss falls) while the judged score can slip;
    # averaging with the starting point keeps part of the gain and gives back less elsewhere.
    # Half and half (WiSE-FT's midpoint, not tuned) measured side by side against no averaging:
    # SciFact dev -0.0051 -> +0.0002 nDCG@10 vs base, Cranfield +0.0091 -> +0.0067
    # (docs/benchmarks.md)
    #: the only setting measured at or above the base on both, so the default.
    # A later run (another machine): Cranfield +0.0071, SciFact -0.0012, neither separable from
    # 0 by its 95% interval. 0 ships the best checkpoint as trained.
    base_merge: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5

    @model_validator(mode="after")
    def _micro_batch_fits(self) -> TrainingConfig:
        if self.micro_batch_size > self.batch_size:
            raise ValueError("training.micro_batch_size must not exceed training.batch_size")
        return self


class EvaluationConfig(_Section):
    """Evaluation: held-out synthetic test split unless customer judgements are supplied."""

    test_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1
    # A tuned model must beat its base by at least this much nDCG@10 to be recommended.
    min_gain: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.0
    # The teacher check re-ranks the student's top `teacher_check_depth` for at most this many
    # judged queries (the teacher is the CPU bottleneck: queries x depth pairs).
    teacher_check_queries: Annotated[int, Field(ge=1, le=100_000)] = 100
    teacher_check_depth: Annotated[int, Field(ge=2, le=1000)] = 20


class RecipeConfig(_Section):
    """Everything a specialization run needs besides the corpus itself."""

    seed: int = 13
    student: str = "minilm-l6"
    teacher: str = "ms-marco-minilm-l12"
    generator: str = "smollm2-135m"
    # The number format of whole-corpus encoding (filter's candidates, evaluate's retrieval):
    # "auto" is bf16 where the hardware computes it natively (CPUs with AVX512-BF16 or AMX,
    # CUDA GPUs with bf16) and fp32 elsewhere, where bf16 would be emulated and slower.
    # Measured on 4,096 SciFact dev chunks, 2 cores (`python -m bench.encode`): bf16 encodes
    # 2.09x faster than fp32 at a cosine of at least 0.99997 to the fp32 vectors
    # (docs/benchmarks.md)
    #. Training, exported models and the /embed endpoint always compute in fp32.
    encode_precision: Literal["auto", "fp32", "bf16"] = "auto"
    corpus: CorpusConfig = CorpusConfig()
    generation: GenerationConfig = GenerationConfig()
    candidates: CandidateConfig = CandidateConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    def fingerprint(self, *sections: str) -> str:
        """sha256 of the named sections (all when none): a stage's config hash in its manifest."""
        data = self.model_dump(mode="json")
        if sections:
            data = {name: data[name] for name in sections}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


# Presets are partial overrides applied on top of the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The embedded demo on a 2-core machine: a few hundred queries, short lists, few epochs.
    "quick": {
        "generation": {"passages": 72, "query_types": ["claims", "keywords", "titles"],
                       "max_new_tokens": 24},
        "candidates": {"top_k": 10, "student_top_n": 10},
        "training": {"list_size": 8, "batch_size": 16, "micro_batch_size": 16, "max_epochs": 2,
                     "max_passage_length": 128},
        "evaluation": {"teacher_check_queries": 40, "teacher_check_depth": 10},
    },
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(preset: str = "default", overrides: dict[str, Any] | None = None) -> RecipeConfig:
    """A RecipeConfig from a preset and nested overrides; KeyError for an unknown preset."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return RecipeConfig.model_validate(_merge(PRESETS[preset], overrides or {}))


def load_config(path: Path | None, preset: str = "default") -> RecipeConfig:
    """Read a YAML or JSON recipe file (nested overrides, optional top-level `preset`)."""
    overrides: dict[str, Any] = {}
    if path is not None:
        overrides = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"{path}: a recipe file must hold a mapping")
        preset = overrides.pop("preset", preset)
    return build_config(preset, overrides)
