"""Recipe configuration: the one typed description of a specialization run.

Shared by ml_core (which runs it), the worker (which stores it with a job) and the app (which
validates a customer's job spec against it). Defaults follow the recipe (docs/recipe.md),
scaled to what a CPU machine can do; the paper's GPU-scale values are noted where they differ.
Each measured default names its entry in docs/benchmarks.md.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)


class QueryType(StrEnum):
    """The six synthetic query types of the recipe (Tamber et al. 2025, section 3), which the
    generator writes, two extractive types read off the corpus with no generator, and one the
    generator writes like the customer's own example queries."""

    QUESTIONS = "questions"
    CLAIMS = "claims"
    TITLES = "titles"
    KEYWORDS = "keywords"
    ZERO_SHOT_USER = "zero_shot_user"
    FEW_SHOT_USER = "few_shot_user"
    # The passage's own title from the corpus, as is (one query per titled document).
    SOURCE_TITLES = "source_titles"
    # A seeded sentence of the passage, or a span of it when sentences are long: the pseudo-query
    # of the inverse cloze task (Lee et al. 2019, arXiv 1906.00300).
    EXTRACTIVE = "extractive"
    # Written like the customer's own example queries (generation.example_queries), each shown
    # beside the corpus passage BM25 ranks first for it: Promptagator's few-shot prompting with
    # a handful of the task's queries (Dai et al. 2022, arXiv 2209.11755).
    LIKE_EXAMPLES = "like_examples"


ALL_QUERY_TYPES: tuple[QueryType, ...] = tuple(QueryType)
EXTRACTIVE_QUERY_TYPES: frozenset[QueryType] = frozenset(
    {QueryType.SOURCE_TITLES, QueryType.EXTRACTIVE})
# The types an instruction LLM writes, each with its prompt.
LLM_QUERY_TYPES: tuple[QueryType, ...] = tuple(
    t for t in QueryType if t not in EXTRACTIVE_QUERY_TYPES)


# The customer's example queries (generation.example_queries): a few are enough, as few-shot
# examples; a search log belongs in a query set instead (StageContext.train_queries).
MAX_EXAMPLE_QUERIES = 64
ExampleQuery = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1,
                                                max_length=500)]


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

    # Four of the paper's six types fit a 2-core budget; the two user-query types can be added
    # per job (docs/benchmarks.md, "Six query types").
    query_types: Annotated[list[QueryType], Field(min_length=1)] = [
        QueryType.QUESTIONS,
        QueryType.CLAIMS,
        QueryType.KEYWORDS,
        QueryType.TITLES,
    ]
    # Passages sampled for generation, one query per passage per type (paper: up to 100k).
    # Sized so a whole run fits an hour on 2 CPU cores; raise it on a GPU worker.
    passages: Annotated[int, Field(ge=1, le=1_000_000)] = 160
    # Passages the extractive types (extractive, source_titles) cover: the `passages` sample
    # plus a seeded draw of more, up to the whole corpus, since they cost no generator call
    # (None: the `passages` sample, like the generated types).
    cheap_passages: Annotated[int | None, Field(ge=1, le=10_000_000)] = None
    # Off: no synthetic queries; the job trains on the queries it is given (the customer's own
    # unlabelled queries, e.g. a search log; StageContext.train_queries) and nothing else.
    synthetic: bool = True
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    # For backend="openai": any OpenAI-compatible completions endpoint (vLLM server, hosted API).
    endpoint: str | None = None
    api_key_env: str = "TAILOR_GENERATOR_API_KEY"
    # The paper samples Llama-3.1-8B at 0.8; the small default generator drifts off topic there
    # (docs/benchmarks.md, "Generator temperature"). Raise it for a large generator.
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.3
    max_new_tokens: Annotated[int, Field(ge=4, le=256)] = 32
    few_shot_examples: Annotated[int, Field(ge=0, le=8)] = 3
    # A handful of real queries from the customer's users, no judgements needed: the
    # like_examples type writes queries in their style (docs/benchmarks.md, "Queries written
    # like the customer's").
    example_queries: Annotated[list[ExampleQuery], Field(max_length=MAX_EXAMPLE_QUERIES)] = []
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    # The in-process generator's number format (vLLM picks its own). "auto": bf16 where the
    # hardware computes it natively, else fp32 (docs/benchmarks.md, "bf16 generation").
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    @model_validator(mode="after")
    def _example_queries_for_like_examples(self) -> GenerationConfig:
        wanted = QueryType.LIKE_EXAMPLES in self.query_types
        if wanted and not self.example_queries:
            raise ValueError("generation.query_types has like_examples, which writes queries "
                             "like the customer's: give some in generation.example_queries")
        if self.example_queries and not wanted:
            raise ValueError("generation.example_queries is read only by the like_examples "
                             "query type: add like_examples to generation.query_types")
        return self

    @model_validator(mode="after")
    def _endpoint_for_openai(self) -> GenerationConfig:
        if self.backend == "openai" and not self.endpoint:
            raise ValueError("generation.endpoint is required when generation.backend is 'openai'")
        return self

    @model_validator(mode="after")
    def _cheap_passages_for_extractive_types(self) -> GenerationConfig:
        if self.cheap_passages is None:
            return self
        if not EXTRACTIVE_QUERY_TYPES.intersection(self.query_types):
            raise ValueError(
                "generation.cheap_passages sizes the extractive query types ("
                + ", ".join(sorted(t.value for t in EXTRACTIVE_QUERY_TYPES))
                + "), and generation.query_types has none of them")
        if self.cheap_passages < self.passages:
            raise ValueError(f"generation.cheap_passages ({self.cheap_passages}) must be at least "
                             f"generation.passages ({self.passages}): the extractive types cover "
                             "the generated types' sample and more")
        return self


class CandidateConfig(_Section):
    """First-stage candidates, teacher scoring and the round-trip filter."""

    # Candidates per query from the fused first stage (paper: 100). The teacher scores them
    # all, so this is the main CPU cost; 16 fills lists of 16 (training.list_size).
    top_k: Annotated[int, Field(ge=2, le=1000)] = 16
    use_bm25: bool = True
    rrf_k: Annotated[int, Field(ge=1, le=1000)] = 60
    # Round-trip filter: the source passage must be the teacher's #1 and in the student's top N.
    round_trip: bool = True
    student_top_n: Annotated[int, Field(ge=1, le=1000)] = 20
    # What the round trip must find: the source passage itself (the paper), or any chunk of its
    # document, which keeps queries whose best match is a sibling chunk; that measured no better
    # (docs/benchmarks.md, "Document round trip").
    round_trip_scope: Literal["passage", "document"] = "passage"
    # Drop queries whose best teacher score is under this percentile of all best scores.
    min_score_percentile: Annotated[float, Field(ge=0.0, le=99.0)] = 25.0
    # Teacher scores are min-max normalised between these percentiles and clipped to [0, 1].
    norm_low_percentile: Annotated[float, Field(ge=0.0, le=50.0)] = 1.0
    norm_high_percentile: Annotated[float, Field(ge=50.0, le=100.0)] = 99.0
    # "fused" blends the teacher's scores with the first stage's reciprocal ranks, so that where
    # the cross-encoder is no better than the student (docs/models.md) their agreement still
    # counts; "cross_encoder" is the teacher's scores alone, the paper's (docs/benchmarks.md,
    # "Teacher signal"). "teachers" and "teachers_fused" are the same with the job's teacher
    # and every co_teacher averaged, each normalised by its own percentiles (docs/benchmarks.md,
    # "Late-interaction teacher").
    teacher_signal: Literal["cross_encoder", "fused", "teachers", "teachers_fused"] = "fused"
    fused_teacher_weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    # Teachers of the registry scored beside the job's `teacher` for the "teachers" signals
    # (e.g. answerai-colbert-small next to the cross-encoder).
    co_teachers: list[str] = []
    teacher_batch_size: Annotated[int, Field(ge=1, le=1024)] = 32
    # Two rounds for long lists (None: one): the round trip runs on the top filter_depth and only
    # the queries it keeps get the rest scored, since the teacher is the CPU bottleneck and
    # drops most queries (docs/benchmarks.md, "Lists of 32").
    filter_depth: Annotated[int | None, Field(ge=2, le=1000)] = None
    # Other bi-encoders of the registry whose top_k lists join the fusion: they widen the
    # candidate pool and vote in the fused signal, never trained (docs/benchmarks.md,
    # "Helper retriever").
    helpers: list[str] = []
    # Easy candidates: this many of the top_k slots are drawn (seeded, per query) from the fused
    # ranks below the rest, down to easy_depth, so a list spans hard and easy passages as the
    # paper's top-100 lists do, for the teacher cost of top_k (0: the fused top_k alone;
    # docs/benchmarks.md, "Lists mixing hard and easy candidates").
    easy_k: Annotated[int, Field(ge=0, le=999)] = 0
    easy_depth: Annotated[int, Field(ge=2, le=1000)] = 100

    @model_validator(mode="after")
    def _easy_within_the_list(self) -> CandidateConfig:
        if self.easy_k and self.easy_k >= self.top_k:
            raise ValueError(f"candidates.easy_k ({self.easy_k}) must be below candidates.top_k "
                             f"({self.top_k}): a list keeps at least one hard candidate")
        if self.easy_k and self.easy_depth <= self.top_k:
            raise ValueError(f"candidates.easy_depth ({self.easy_depth}) must exceed "
                             f"candidates.top_k ({self.top_k})")
        return self

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

    @field_validator("co_teachers")
    @classmethod
    def _distinct_co_teachers(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"co_teachers are named more than once: {value}")
        return value

    @model_validator(mode="after")
    def _co_teachers_with_their_signal(self) -> CandidateConfig:
        averaged = self.teacher_signal in ("teachers", "teachers_fused")
        if averaged and not self.co_teachers:
            raise ValueError(f"candidates.teacher_signal {self.teacher_signal!r} averages the "
                             "job's teacher with candidates.co_teachers, which is empty")
        if self.co_teachers and not averaged:
            raise ValueError(f"candidates.co_teachers are scored only for teacher_signal "
                             f"'teachers' or 'teachers_fused', not {self.teacher_signal!r}")
        return self


class TrainingConfig(_Section):
    """Student training: listwise distillation + a small InfoNCE term (or the InfoNCE baseline)."""

    loss: Literal["listwise", "infonce"] = "listwise"
    # Passages per list: the positive + (list_size - 1) candidates (paper: 20; docs/benchmarks.md,
    # "List size").
    list_size: Annotated[int, Field(ge=2, le=128)] = 16
    # Queries per optimizer step and per gradient-cache chunk (the chunk sets the memory; a
    # batch of one chunk skips the cache's second forward pass). Paper: 4,096 in chunks of 16.
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 32
    micro_batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    # Paper: 2e-4 at 4,096 queries per step. Higher rates overfit a few hundred synthetic
    # queries (docs/benchmarks.md, "Learning rate").
    learning_rate: Annotated[float, Field(gt=0.0, le=1e-2)] = 2e-5
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    warmup_epochs: Annotated[float, Field(ge=0.0, le=10.0)] = 0.5
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    grad_clip: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    # A cap: early stopping on the dev loss (patience) usually ends training first (paper: up
    # to 30; docs/benchmarks.md, "Epoch cap").
    max_epochs: Annotated[int, Field(ge=1, le=100)] = 8
    patience: Annotated[int, Field(ge=1, le=100)] = 2
    kl_student_temperature: Annotated[float, Field(gt=0.0, le=10.0)] = 0.05
    # The paper's 0.3 suits lists from the top 100; our lists are a few hard candidates with
    # close scores, where 0.3 flattens the target and pulls hard negatives toward the query
    # (docs/benchmarks.md, "Teacher temperature").
    kl_teacher_temperature: Annotated[float, Field(gt=0.0, le=10.0)] = 0.05
    infonce_temperature: Annotated[float, Field(gt=0.0, le=10.0)] = 0.01
    infonce_weight: Annotated[float, Field(ge=0.0, le=10.0)] = 0.1
    false_negative_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.6
    max_query_length: Annotated[int, Field(ge=8, le=512)] = 64
    max_passage_length: Annotated[int, Field(ge=16, le=8192)] = 128
    dev_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1
    # The number format of the student's forward and backward passes (weights, optimizer and
    # loss stay float32). "auto": bf16 where the hardware computes it natively, else fp32
    # (docs/benchmarks.md, "bf16 training").
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Also train on queries the round trip dropped only because the teacher ranked another
    # passage first, with that passage as the positive. Off: it helps only where the teacher
    # beats the student (docs/benchmarks.md, "Relabelled disagreements").
    relabel_disagreements: bool = False
    # Export (1 - base_merge) x the best checkpoint + base_merge x the base (WiSE-FT, arXiv
    # 2109.01903; 0: as trained): training overfits a few hundred synthetic queries, and the
    # average gives back less elsewhere (docs/benchmarks.md, "Averaging with the base").
    base_merge: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    # Every dropout probability of the student while it trains (0: none, as the paper trains
    # at 4,096 queries per step). The gradient cache replays each chunk's random state, so its
    # gradients stay exact with dropout on; dev loss and export run without it. It did not
    # help and costs memory: lower micro_batch_size with it (docs/benchmarks.md, "Dropout while
    # training").
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # Train only the top N transformer layers, the embeddings and lower layers frozen (None:
    # all): less drift from the base, and a cheaper backward pass (docs/benchmarks.md, "Top
    # layers only").
    train_layers: Annotated[int | None, Field(ge=1, le=256)] = None
    # Which side trains: "both" (one encoder for queries and passages, as the recipe),
    # "queries" (query-side fine-tuning: every passage keeps the base model's vector) or
    # "passages" (every query keeps the base's vector); the frozen side's vectors are computed
    # once. Either side alone gained less than both tied (docs/benchmarks.md, "Query tower
    # only"). A benchmark setting: job specs refuse it, since a job's export is one encoder.
    tune: Literal["both", "queries", "passages"] = "both"
    # Weight of a pull toward the base model while training: the mean squared distance between
    # each text's normalised vector and the one the starting weights give it (queries and
    # passages weighted alike), added to the loss. 0: no pull; the export's averaging with the
    # base (base_merge) is the default's guard against drift (docs/benchmarks.md, "A pull
    # toward the base while training").
    base_anchor: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0

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
    # The report's rows for each model on whole documents (and what chunking buys over them)
    # cost one more encoding of every chunked document per model; off, the set-ups compared
    # are BM25 and each model on chunks, alone and fused with BM25.
    whole_documents: bool = True


class RecipeConfig(_Section):
    """Everything a specialization run needs besides the corpus itself."""

    seed: int = 13
    student: str = "minilm-l6"
    teacher: str = "ms-marco-minilm-l12"
    generator: str = "smollm2-135m"
    # The number format of whole-corpus encoding (filter and evaluate): "auto" is bf16 where
    # the hardware computes it natively, else fp32, where bf16 would be emulated and slower
    # (docs/benchmarks.md, "bf16 corpus encoding"). Exported models and /embed use fp32.
    encode_precision: Literal["auto", "fp32", "bf16"] = "auto"
    corpus: CorpusConfig = CorpusConfig()
    generation: GenerationConfig = GenerationConfig()
    candidates: CandidateConfig = CandidateConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    def fingerprint(self, *sections: str) -> str:
        """sha256 of the named sections (all when none): tells two recipes' sections apart."""
        data = self.model_dump(mode="json")
        if sections:
            data = {name: data[name] for name in sections}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


# Presets are partial overrides applied on top of the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The demo on a 2-core machine: a few hundred queries, short lists, few epochs. A quarter
    # of the queries select the checkpoint: a dev split of ~5 queries could not tell the tuned
    # model from the base (docs/benchmarks.md, "Demo dev split"). Sized to finish within 15
    # minutes from a fresh clone on the slowest 2-core machine measured: two-round filtering,
    # no whole-document rows (docs/benchmarks.md, "The demo on the slowest machine").
    "quick": {
        "generation": {"passages": 96, "query_types": ["claims", "keywords", "titles"],
                       "max_new_tokens": 24},
        "candidates": {"top_k": 10, "student_top_n": 10, "filter_depth": 5},
        "training": {"list_size": 8, "batch_size": 16, "micro_batch_size": 16, "max_epochs": 4,
                     "max_passage_length": 128, "dev_fraction": 0.25},
        "evaluation": {"teacher_check_queries": 40, "teacher_check_depth": 10,
                       "whole_documents": False},
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
