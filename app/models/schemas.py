"""Model response schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.metadata import Metadata, Name


class ModelRead(BaseModel):
    """A model that can embed: a base student by name, or the tenant's own model by `mdl_` id
    (tuned by a job, or uploaded)."""

    id: str = Field(description="Pass this as `model` to /v1/embed, /v1/embeddings and "
                    "/v1/embedding-jobs, or as a job's `base_model`.")
    kind: Literal["base", "tuned", "uploaded"]
    name: str
    base_model: str | None = Field(description="For a tuned model, the student it started from.")
    dim: int | None = Field(description="Embedding dimension.")
    job_id: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    recommended: bool | None = Field(
        default=None, description="Tuned model: whether evaluation recommends it over its base."
    )
    licence: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict, description="Your own pairs "
                                     "(tuned and uploaded models).")
    created_at: datetime | None = None


class ModelUpdate(BaseModel):
    """New values for one of your models' name or metadata; fields left out keep theirs.
    `metadata` replaces the whole set (send `{}` to clear it)."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    metadata: Metadata | None = None


class ModelList(BaseModel):
    """Base models first, then the tenant's own models (newest first)."""

    data: list[ModelRead]
    count: int
