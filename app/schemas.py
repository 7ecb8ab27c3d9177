"""Schema building blocks shared by the domains."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ReadSchema(BaseModel):
    """A response schema filled from an ORM object (handlers return rows)."""

    model_config = ConfigDict(from_attributes=True)
