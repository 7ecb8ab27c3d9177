"""API key request and response schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from app.db.base import utcnow
from app.db.models import KeyScope
from app.schemas import ReadSchema


class ApiKeyCreate(BaseModel):
    """A new key: its name, what it may call, and how long it works."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=200, description="To recognise it in the list.")
    scope: KeyScope = Field(
        default=KeyScope.TRAIN,
        description="`train`: every route. `embed`: the embedding and rerank routes only "
        "(/v1/embed, /v1/embeddings, /v1/rerank, /v1/rerank/models), e.g. for a search "
        "service.",
    )
    expires_in_days: int | None = Field(
        default=None, ge=1, le=3650, strict=True,
        description="Days until the key stops working; none: until it is revoked.",
    )


class ApiKeyRead(ReadSchema):
    """A key, without its secret."""

    id: str = Field(examples=["key_5d1c0e9a2b7f4c6d8e0a1b2c"])
    name: str
    scope: KeyScope
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status(self) -> Literal["active", "expired", "revoked"]:
        """Whether the key works now."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= utcnow():
            return "expired"
        return "active"


class ApiKeyCreated(ApiKeyRead):
    """A new key with its secret: the only response that shows it. Store it now."""

    key: str = Field(description="The secret: `Authorization: Bearer <key>`. Shown only once.")


class ApiKeyList(BaseModel):
    """A page of the tenant's keys (revoked and expired ones too), newest first."""

    data: list[ApiKeyRead]
    count: int
