"""Embedding request and response schemas: Tailor's own and the OpenAI-compatible ones."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_INPUTS = 256
MAX_INPUT_CHARS = 16_384

InputText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_INPUT_CHARS)]
InputType = Literal["query", "passage"]


class EmbedRequest(BaseModel):
    """Texts to embed with a base (name) or tuned (`mdl_...`) model."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(examples=["minilm-l6"])
    inputs: list[InputText] = Field(min_length=1, max_length=MAX_INPUTS)
    input_type: InputType = Field(
        default="passage",
        description="Queries and passages get the model's own prefixes (asymmetric models).",
    )


class Embedding(BaseModel):
    """One input's vector."""

    index: int
    embedding: list[float]


class EmbedResponse(BaseModel):
    """Vectors in input order."""

    model: str
    data: list[Embedding]
    dim: int


class OpenAIEmbeddingRequest(BaseModel):
    """OpenAI `POST /v1/embeddings`. Inputs are embedded as passages unless `input_type` is
    "query" (send it with the OpenAI SDK as `extra_body={"input_type": "query"}`) or the model
    name ends in `:query` (for clients that can only set the model name)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(examples=["minilm-l6", "mdl_5d1c0e9a2b7f4c6d8e0a1b2c:query"])
    input: InputText | Annotated[list[InputText], Field(min_length=1, max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: little-endian float32 bytes, as OpenAI sends."
    )
    dimensions: int | None = Field(
        default=None, ge=1, description="Must equal the model's dimension when given."
    )
    user: str | None = None
    input_type: InputType | None = Field(default=None, description="Tailor extension.")


class OpenAIEmbedding(BaseModel):
    """One vector in OpenAI's shape."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIUsage(BaseModel):
    """Token counts (the model's own tokenizer)."""

    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    """OpenAI's embeddings list."""

    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage
