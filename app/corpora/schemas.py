"""Corpus request and response schemas."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.schemas import ReadSchema
from app.uploads import file_upload_body


class CorpusRead(ReadSchema):
    """A validated corpus."""

    id: str = Field(examples=["crp_5d1c0e9a2b7f4c6d8e0a1b2c"])
    name: str
    filename: str = Field(description="The uploaded file's name.")
    size_bytes: int = Field(description="Size of the stored file (compressed if gzip).")
    sha256: str = Field(description="sha256 of the uploaded bytes.")
    documents: int = Field(description="Number of documents (JSON lines).")
    created_at: datetime


class CorpusList(BaseModel):
    """A page of corpora, newest first, and how many there are in all."""

    data: list[CorpusRead]
    count: int


# Documents the multipart body of POST /v1/corpora (parsed by app.uploads, not by FastAPI).
CORPUS_UPLOAD_BODY = file_upload_body(
    "BEIR corpus: JSON lines with `_id` (or `id`), optional `title`, and `text`; plain or gzip."
)
