"""Rerank request and response schemas, in the shape of Cohere's and TEI's rerank."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.embeddings.schemas import MAX_INPUT_CHARS, InputText

QueryText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_INPUT_CHARS)]


class RerankDocument(BaseModel):
    """A document as an object (Cohere's older shape); only `text` is read."""

    model_config = ConfigDict(extra="ignore")

    text: InputText


class RerankRequest(BaseModel):
    """A query and the documents to order by relevance to it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A teacher in the catalogue (`GET /v1/rerank/models`).",
                       examples=["ms-marco-minilm-l12"])
    query: QueryText
    documents: list[InputText | RerankDocument] = Field(
        min_length=1, description="Up to `embed_max_inputs` documents (2,048 by default): "
        "strings or {\"text\": ...} objects.")
    top_n: int | None = Field(default=None, ge=1,
                              description="Return only the best `top_n` (default: all).")
    return_documents: bool = Field(default=False,
                                   description="Include each document's text in its result.")
    raw_scores: bool = Field(
        default=False, description="`relevance_score` as the teacher's raw score instead of "
        "mapped into 0..1 (a cross-encoder's logit through a sigmoid).")


class RerankResultDocument(BaseModel):
    """The document's text, when asked for."""

    text: str


class RerankResult(BaseModel):
    """One document: where it was in the request, and how relevant it is."""

    index: int
    relevance_score: float
    document: RerankResultDocument | None = None


class RerankResponse(BaseModel):
    """Results, most relevant first."""

    id: str
    model: str
    results: list[RerankResult]


class RerankModel(BaseModel):
    """A teacher that /v1/rerank serves."""

    id: str
    licence: str | None = None
    source: str | None = None


class RerankModelList(BaseModel):
    """The rerank models on offer."""

    data: list[RerankModel]
    count: int
