"""Eval set request and response schemas."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.schemas import ReadSchema


class EvalSetRead(ReadSchema):
    """Stored judgements for one corpus."""

    id: str = Field(examples=["evs_5d1c0e9a2b7f4c6d8e0a1b2c"])
    corpus_id: str
    name: str
    queries: int = Field(description="Queries that have at least one judgement.")
    judgements: int = Field(description="(query, document) judgements in the qrels.")
    created_at: datetime


class EvalSetList(BaseModel):
    """A page of eval sets, newest first, and how many there are in all."""

    data: list[EvalSetRead]
    count: int


EVAL_SET_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["corpus_id", "queries", "qrels"],
                "properties": {
                    "corpus_id": {"type": "string", "description": "The judged corpus."},
                    "name": {"type": "string", "maxLength": 200},
                    "queries": {
                        "type": "string",
                        "format": "binary",
                        "description": "BEIR queries: JSON lines with `_id` and `text`.",
                    },
                    "qrels": {
                        "type": "string",
                        "format": "binary",
                        "description": "BEIR qrels TSV: query-id, corpus-id, score "
                        "(header line optional).",
                    },
                },
            }
        }
    },
}
