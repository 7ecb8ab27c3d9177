"""Model response schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


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
    created_at: datetime | None = None


class ModelList(BaseModel):
    """Base models first, then the tenant's own models (newest first)."""

    data: list[ModelRead]
    count: int
