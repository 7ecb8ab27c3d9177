"""Embedding request and response schemas: Tailor's own and the OpenAI-compatible ones.

How many inputs a request may hold is a setting (`embed_max_inputs`), checked by the routes so
the error names the limit; the shapes here check everything that does not depend on settings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

MAX_INPUT_CHARS = 16_384

InputText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_INPUT_CHARS)]
InputType = Literal["query", "passage"]

TRUNCATE_DESCRIPTION = (
    "true: inputs longer than the model's token limit are cut there (the response counts them "
    "in `truncated`); false: such an input is refused with a 422 naming it."
)
DIMENSIONS_DESCRIPTION = (
    "Return the first `dimensions` components, re-normalised: only for models trained to be "
    "truncated (Matryoshka; `matryoshka_dims` in the model's spec). Otherwise it must equal "
    "the model's dimension."
)


class EmbedRequest(BaseModel):
    """Texts to embed with a base (name) or tuned (`mdl_...`) model."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(examples=["minilm-l6"])
    inputs: list[InputText] = Field(
        min_length=1, description="Up to `embed_max_inputs` texts (2,048 by default)."
    )
    input_type: InputType = Field(
        default="passage",
        description="Queries and passages get the model's own prefixes (asymmetric models).",
    )
    truncate: bool = Field(default=True, description=TRUNCATE_DESCRIPTION)
    dimensions: int | None = Field(default=None, ge=1, description=DIMENSIONS_DESCRIPTION)


class Embedding(BaseModel):
    """One input's vector."""

    index: int
    embedding: list[float]


class EmbedResponse(BaseModel):
    """Vectors in input order."""

    model: str
    data: list[Embedding]
    dim: int
    tokens: int = Field(description="Tokens embedded (the model's tokenizer, after cutting).")
    truncated: int = Field(description="How many inputs were cut at the model's token limit.")


TokenIds = list[int]
OpenAIInput = str | list[str] | TokenIds | list[TokenIds]


def check_openai_input(value: Any) -> Any:
    """`input` as OpenAI accepts it: a string, strings, token ids, or lists of token ids.

    Raises ValueError naming the first offending item (the count limit is the route's)."""
    if isinstance(value, str):
        _check_text(value, "input")
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string, a list of strings, a list of token ids or a list "
                         "of token-id lists")
    if not value:
        raise ValueError("must hold at least one input")
    first = value[0]
    if isinstance(first, int) and not isinstance(first, bool):
        _check_ids(value, "input")
        return value
    for i, item in enumerate(value):
        if isinstance(first, str):
            if not isinstance(item, str):
                raise ValueError(f"input[{i}] must be a string like input[0]")
            _check_text(item, f"input[{i}]")
        elif isinstance(first, list):
            if not isinstance(item, list):
                raise ValueError(f"input[{i}] must be a list of token ids like input[0]")
            _check_ids(item, f"input[{i}]")
        else:
            raise ValueError("input[0] must be a string, a token id or a list of token ids")
    return value


def _check_text(text: str, where: str) -> None:
    if not text:
        raise ValueError(f"{where} is an empty string")
    if len(text) > MAX_INPUT_CHARS:
        raise ValueError(f"{where} has {len(text)} characters; at most {MAX_INPUT_CHARS}")


def _check_ids(ids: list[Any], where: str) -> None:
    if not ids:
        raise ValueError(f"{where} is an empty list of token ids")
    for j, token in enumerate(ids):
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise ValueError(f"{where}[{j}] must be a token id (an integer >= 0)")


class OpenAIEmbeddingRequest(BaseModel):
    """OpenAI `POST /v1/embeddings`. Inputs are embedded as passages unless `input_type` is
    "query" (send it with the OpenAI SDK as `extra_body={"input_type": "query"}`) or the model
    name ends in `:query` (for clients that can only set the model name). Token-id inputs are
    OpenAI's (cl100k_base, what the OpenAI SDK and LangChain send): they are decoded to text
    and embedded with the model's own tokenizer."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(examples=["minilm-l6", "mdl_5d1c0e9a2b7f4c6d8e0a1b2c:query"])
    input: OpenAIInput = Field(
        description="A string, up to `embed_max_inputs` strings (2,048 by default), a list of "
        "token ids, or a list of token-id lists."
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: little-endian float32 bytes, as OpenAI sends."
    )
    dimensions: int | None = Field(default=None, ge=1, description=DIMENSIONS_DESCRIPTION)
    user: str | None = None
    input_type: InputType | None = Field(default=None, description="Tailor extension.")
    truncate: bool = Field(default=True, description="Tailor extension. " + TRUNCATE_DESCRIPTION)

    _check_input = field_validator("input", mode="before")(check_openai_input)


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
    """OpenAI's embeddings list (plus `truncated`, how many inputs were cut)."""

    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage
    truncated: int = 0


class OpenAIErrorDetail(BaseModel):
    """OpenAI's error object: what OpenAI clients read to explain a failure."""

    model_config = ConfigDict(extra="allow")

    message: str
    type: str = Field(examples=["invalid_request_error"])
    param: str | None = Field(default=None, description="The request field at fault.")
    code: str | None = Field(default=None, examples=["model_not_found"])


class OpenAIError(BaseModel):
    """The error body of the OpenAI-compatible route (the rest of the API has its own)."""

    error: OpenAIErrorDetail
