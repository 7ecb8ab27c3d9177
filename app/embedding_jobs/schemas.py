"""Bulk embedding job request and response schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from app.db.models import JobStatus
from app.metadata import Metadata, Name
from app.schemas import ReadSchema


class EmbeddingJobCreate(BaseModel):
    """What to embed: a stored corpus, with which model, as which kind of input."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=100, examples=["mdl_5d1c0e9a2b7f4c6d8e0a1b2c"],
                       description="A base model's name, or your own model's `mdl_` id (tuned "
                       "by a job, or uploaded).")
    corpus_id: str | None = Field(
        default=None, examples=["crp_5d1c0e9a2b7f4c6d8e0a1b2c"],
        description="The stored corpus to embed. Optional for a tuned model: by default the "
        "corpus it was tuned on, so re-indexing after tuning is this one call.")
    input_type: Literal["passage", "query"] = Field(
        default="passage", description="Which prefix (prompt) the model puts before each text.")
    long_documents: Literal["chunk", "truncate"] = Field(
        default="chunk", description="A document longer than the model's length becomes one row "
        "per chunk (`<id>#<k>`, split as training splits it) or one row cut at the length.")
    shard_documents: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="Documents per shard file (default: the deployment's setting).")
    name: Name | None = None
    metadata: Metadata = Field(default_factory=dict)


class EmbeddingJobRead(ReadSchema):
    """A bulk embedding job: its request, progress and, once succeeded, its counts."""

    id: str = Field(examples=["emb_5d1c0e9a2b7f4c6d8e0a1b2c"])
    name: str | None
    metadata: dict[str, str] = Field(validation_alias=AliasChoices("metadata_", "metadata"))
    model: str
    corpus_id: str
    spec: dict[str, Any] = Field(description="The request with its defaults filled in.")
    status: JobStatus
    progress: float = Field(ge=0.0, le=1.0, description="Share of the corpus's documents done.")
    metrics: dict[str, Any] = Field(description="Once succeeded: documents, rows, dim, shards, "
                                    "truncated rows, seconds.")
    error: dict[str, Any] | None
    attempts: int = Field(description="Deliveries so far (more than one: it was resumed).")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class EmbeddingJobList(BaseModel):
    """A page of bulk embedding jobs, newest first, and how many there are in all."""

    data: list[EmbeddingJobRead]
    count: int


class EmbeddingFile(BaseModel):
    """One stored file of a job: the manifest, or a shard's vectors or ids."""

    name: str = Field(examples=["vectors-00000.npy"])
    kind: Literal["manifest", "vectors", "ids"]
    shard: int | None = Field(description="The shard's index (None for the manifest).")
    rows: int | None = Field(description="Rows in the shard (None for the manifest).")
    size: int = Field(description="Bytes.")
    sha256: str | None = Field(description="sha256 of the file (None for the manifest).")
    url: str = Field(description="Where to GET it (with your API key).")


class EmbeddingFileList(BaseModel):
    """The files stored so far (finished shards appear while the job runs), manifest first."""

    data: list[EmbeddingFile]
    count: int
    complete: bool = Field(description="Whether every document is in (the job succeeded).")
