"""The API's resources as TypedDicts: plain dicts at run time (the JSON as sent), typed for
editors and type checkers. Timestamps stay ISO 8601 strings, as the API sends them.

The server's OpenAPI document (openapi.yaml, or GET /openapi.json) is the reference; these
mirror its response schemas. Fields the server adds later still arrive in the dicts.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, NotRequired, TypedDict, TypeVar

T = TypeVar("T")

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]
FINISHED_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
EventKind = Literal["status", "stage", "progress", "metric", "warning"]
InputType = Literal["query", "passage"]
Recommendation = Literal["tuned", "base"]


class Page(TypedDict, Generic[T]):
    """One page of a list and how many items there are in all."""

    data: list[T]
    count: int


class Corpus(TypedDict):
    id: str
    name: str
    filename: str
    size_bytes: int
    sha256: str
    documents: int
    created_at: str


class EvalSet(TypedDict):
    id: str
    corpus_id: str
    name: str
    queries: int
    judgements: int
    created_at: str


class QuerySet(TypedDict):
    id: str
    corpus_id: str
    name: str
    queries: int
    created_at: str


class Job(TypedDict):
    id: str
    corpus_id: str
    eval_set_id: str | None
    query_set_id: str | None
    status: JobStatus
    stage: str | None
    progress: float
    metrics: dict[str, Any]
    error: dict[str, Any] | None
    model_id: str | None
    recommended: Recommendation | None
    spec: dict[str, Any]
    recipe: dict[str, Any]
    attempts: int
    name: str | None
    metadata: dict[str, str]
    created_at: str
    started_at: str | None
    finished_at: str | None
    updated_at: str


class JobEvent(TypedDict):
    id: int
    created_at: str
    kind: EventKind
    stage: str | None
    progress: float | None
    message: str
    data: dict[str, Any]


class Significance(TypedDict):
    """How sure the nDCG@10 gain is: paired bootstrap interval and sign-flip p-value."""

    metric: str
    queries: int
    difference: float
    ci95: list[float]
    p_value: float
    better: int
    worse: int
    same: int


class Report(TypedDict):
    """A succeeded job's evaluation: base vs tuned, per query type, the teacher check."""

    base: dict[str, Any]
    tuned: dict[str, Any]
    gain: dict[str, float]
    recommended: Recommendation | None
    warnings: list[str]
    per_query_type: dict[str, dict[str, Any]]
    teacher_check: dict[str, Any] | None
    judgements: Literal["customer", "synthetic"] | None
    base_kept: bool | None
    significance: NotRequired[Significance]
    per_query: NotRequired[dict[str, dict[str, float]]]
    excluded_trained_queries: NotRequired[int]


class Model(TypedDict):
    id: str
    kind: Literal["base", "tuned", "uploaded"]
    name: str
    base_model: str | None
    dim: int | None
    job_id: str | None
    metrics: dict[str, Any]
    recommended: bool | None
    licence: str | None
    metadata: dict[str, str]
    created_at: str | None


class Embedding(TypedDict):
    index: int
    embedding: list[float]


class EmbedResponse(TypedDict):
    model: str
    data: list[Embedding]
    dim: int


class OpenAIEmbedding(TypedDict):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class OpenAIUsage(TypedDict):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(TypedDict):
    object: Literal["list"]
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class Health(TypedDict):
    status: str


class Readiness(TypedDict):
    status: str
    checks: dict[str, str]


class RerankResultDocument(TypedDict):
    text: str


class RerankResult(TypedDict):
    """One document: its position in the request and how relevant it is (0..1 unless
    `raw_scores`)."""

    index: int
    relevance_score: float
    document: RerankResultDocument | None


class RerankResponse(TypedDict):
    """Results, most relevant first."""

    id: str
    model: str
    results: list[RerankResult]


class RerankModel(TypedDict):
    id: str
    licence: str | None
    source: str | None


KeyScope = Literal["train", "embed"]


class ApiKey(TypedDict):
    """An API key, without its secret."""

    id: str
    name: str
    scope: KeyScope
    prefix: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    status: Literal["active", "expired", "revoked"]


class ApiKeyCreated(ApiKey):
    """A new key with its secret (`key`): the only answer that shows it."""

    key: str


class EmbeddingJob(TypedDict):
    """A bulk embedding job; `metrics` once succeeded: documents, rows, dim, shards, ..."""

    id: str
    model: str
    corpus_id: str
    spec: dict[str, Any]
    status: JobStatus
    progress: float
    metrics: dict[str, Any]
    error: dict[str, Any] | None
    attempts: int
    name: str | None
    metadata: dict[str, str]
    created_at: str
    started_at: str | None
    finished_at: str | None
    updated_at: str


class EmbeddingFile(TypedDict):
    """A stored file of a bulk embedding job: the manifest, or a shard's vectors or ids."""

    name: str
    kind: Literal["manifest", "vectors", "ids"]
    shard: int | None
    rows: int | None
    size: int
    sha256: str | None
    url: str


class EmbeddingFileList(TypedDict):
    """The files stored so far; `complete` once every document is in."""

    data: list[EmbeddingFile]
    count: int
    complete: bool


WebhookEvent = Literal["job.succeeded", "job.failed", "job.cancelled", "job.stage_completed"]
DeliveryStatus = Literal["pending", "succeeded", "failed"]


class Webhook(TypedDict):
    """A webhook endpoint, without its secret."""

    id: str
    url: str
    events: list[str]
    description: str
    enabled: bool
    created_at: str
    updated_at: str


class WebhookCreated(Webhook):
    """A new endpoint with its signing secret (`whsec_...`): the only answer that shows it."""

    secret: str


class DeliveryAttempt(TypedDict):
    attempt: int
    at: str
    status_code: int | None
    latency_ms: float
    error: str | None


class WebhookDelivery(TypedDict):
    """One event sent to one endpoint and its attempts so far."""

    id: str
    endpoint_id: str
    message_id: str
    event_type: str
    payload: dict[str, Any]
    status: DeliveryStatus
    attempts: int
    max_attempts: int
    next_attempt_at: str | None
    attempt_log: list[DeliveryAttempt]
    created_at: str
    updated_at: str
