"""Query set request and response schemas."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.schemas import ReadSchema


class QuerySetRead(ReadSchema):
    """A customer's own queries, without judgements, for one corpus."""

    id: str = Field(examples=["qrs_5d1c0e9a2b7f4c6d8e0a1b2c"])
    corpus_id: str
    name: str
    queries: int = Field(
        description="Distinct queries (repeats of one text, case and spacing aside, count once)."
    )
    created_at: datetime


class QuerySetList(BaseModel):
    """A page of query sets, newest first, and how many there are in all."""

    data: list[QuerySetRead]
    count: int


QUERY_SET_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["corpus_id", "queries"],
                "properties": {
                    "corpus_id": {"type": "string", "description": "The corpus they search."},
                    "name": {"type": "string", "maxLength": 200},
                    "queries": {
                        "type": "string",
                        "format": "binary",
                        "description": "BEIR queries: JSON lines with `_id` and `text` "
                        "(plain or gzip), e.g. from a search log. No judgements.",
                    },
                },
            }
        }
    },
}
