"""Job request and response schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from app.db.models import EventKind, JobStatus, Recommendation
from app.metadata import Metadata, Name
from app.schemas import ReadSchema
from ml_core.config import PRESETS, QueryType

# The recipe presets, as a type (built from ml_core so the two never disagree).
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]


class JobCreate(BaseModel):
    """What to specialize: the corpus, the models, and optional recipe overrides.

    Unset fields take the preset's values. `hyperparameters` holds nested overrides of the
    recipe sections (`corpus`, `generation`, `candidates`, `training`, `evaluation`, `seed`),
    each range-checked, e.g. `{"training": {"learning_rate": 3e-5, "max_epochs": 4}}`.
    """

    model_config = ConfigDict(extra="forbid")

    corpus_id: str = Field(examples=["crp_5d1c0e9a2b7f4c6d8e0a1b2c"])
    name: Name | None = Field(default=None, description="Your label for the job; its tuned "
                              "model takes it as its name.")
    metadata: Metadata = Field(default_factory=dict)
    base_model: str = Field(default="minilm-l6", description="Student model to specialize: a "
                            "base model's name, or one of your own models' `mdl_` id (one you "
                            "uploaded, or one a job tuned, to tune it again).")
    teacher: str | None = Field(default=None, description="Cross-encoder teacher (registry name).")
    generator: str | None = Field(default=None, description="Query generator (registry name).")
    preset: PresetName = "default"
    query_types: list[QueryType] | None = Field(
        default=None, min_length=1, json_schema_extra={"uniqueItems": True}
    )
    passages: int | None = Field(
        default=None, strict=True, description="Passages sampled for generation."
    )
    loss: Literal["listwise", "infonce"] | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    eval_set_id: str | None = Field(
        default=None, description="Judge with the tenant's own eval set instead of held-out "
        "synthetic queries."
    )
    query_set_id: str | None = Field(
        default=None, description="Also train on the tenant's own queries of this query set "
        "(unjudged, e.g. a search log; the teacher's first choice is each one's positive). A "
        "judged query of the eval set that is also in it is left out of the evaluation."
    )


class JobRead(ReadSchema):
    """A job's request, resolved recipe and progress."""

    id: str = Field(examples=["job_5d1c0e9a2b7f4c6d8e0a1b2c"])
    name: str | None
    metadata: dict[str, str] = Field(validation_alias=AliasChoices("metadata_", "metadata"))
    corpus_id: str
    eval_set_id: str | None
    query_set_id: str | None
    status: JobStatus
    stage: str | None = Field(description="The stage running or last run.")
    progress: float = Field(ge=0.0, le=1.0, description="Overall progress, 0..1.")
    metrics: dict[str, Any]
    error: dict[str, Any] | None
    model_id: str | None = Field(description="The tuned model, once the job has succeeded.")
    recommended: Recommendation | None = Field(
        description="Whether evaluation recommends the tuned model or keeping the base."
    )
    spec: dict[str, Any] = Field(description="The request as sent.")
    recipe: dict[str, Any] = Field(description="The full recipe the worker runs.")
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @model_validator(mode="after")
    def _model_once_succeeded(self) -> JobRead:
        # The worker reserves the id before it uploads the model and creates its row (a
        # redelivered finish reuses it); until the job has succeeded it names nothing.
        if self.status != JobStatus.SUCCEEDED:
            self.model_id = None
        return self


class JobUpdate(BaseModel):
    """New values for a job's name or metadata; fields left out keep theirs. `metadata`
    replaces the whole set (send `{}` to clear it), `name: null` clears the name."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    metadata: Metadata | None = None


class JobList(BaseModel):
    """A page of jobs, newest first, and how many there are in all."""

    data: list[JobRead]
    count: int


class JobEventRead(ReadSchema):
    """One entry of a job's event log."""

    id: int = Field(description="Increasing; pass the last one seen as `after`.")
    created_at: datetime
    kind: EventKind
    stage: str | None
    progress: float | None
    message: str
    data: dict[str, Any]


class JobEventList(BaseModel):
    """Events after the cursor, oldest first, and how many the job has in all."""

    data: list[JobEventRead]
    count: int


class JobReport(BaseModel):
    """The evaluation report of a succeeded job (base vs tuned)."""

    model_config = ConfigDict(extra="allow")

    base: dict[str, Any] = Field(default_factory=dict)
    tuned: dict[str, Any] = Field(default_factory=dict)
    gain: dict[str, Any] = Field(default_factory=dict)
    recommended: Recommendation | None = None
    warnings: list[Any] = Field(default_factory=list)
    per_query_type: dict[str, Any] = Field(default_factory=dict)
    teacher_check: dict[str, Any] = Field(default_factory=dict)
    judgements: Literal["customer", "synthetic"] | None = None
    # Training never beat the base on its dev loss: the tuned model is the base's weights.
    base_kept: bool | None = None
