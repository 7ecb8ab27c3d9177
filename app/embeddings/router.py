"""Embedding routes: Tailor's /v1/embed and the OpenAI-compatible /v1/embeddings."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from app.deps import CurrentTenant, RegistryDep, SessionDep
from app.embeddings.schemas import (
    Embedding,
    EmbedRequest,
    EmbedResponse,
    OpenAIEmbedding,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    OpenAIUsage,
)
from app.embeddings.service import EmbeddingModels, resolve_source
from app.errors import InvalidRequest, NotFound, Unauthorized, Unavailable, responses

router = APIRouter(prefix="/v1", tags=["embeddings"])

QUERY_SUFFIXES = {":query": "query", ":passage": "passage"}


def _models(request: Request) -> EmbeddingModels:
    return request.app.state.embedding_models


ModelsDep = Annotated[EmbeddingModels, Depends(_models)]
ERRORS = responses(Unauthorized, NotFound, InvalidRequest, Unavailable)


@router.post("/embed", response_model=EmbedResponse, responses=ERRORS)
def embed(
    body: EmbedRequest,
    session: SessionDep,
    tenant: CurrentTenant,
    registry: RegistryDep,
    models: ModelsDep,
) -> EmbedResponse:
    """Embed queries or passages with a base or tuned model."""
    source = resolve_source(session, tenant, registry, body.model)
    session.commit()  # release the connection before the (slow) encoding
    encoded = models.encode(source, body.inputs, body.input_type)
    return EmbedResponse(
        model=body.model,
        dim=int(encoded.vectors.shape[1]),
        data=[Embedding(index=i, embedding=row.tolist()) for i, row in enumerate(encoded.vectors)],
    )


@router.post("/embeddings", response_model=OpenAIEmbeddingResponse, responses=ERRORS)
def create_embeddings(
    body: OpenAIEmbeddingRequest,
    session: SessionDep,
    tenant: CurrentTenant,
    registry: RegistryDep,
    models: ModelsDep,
) -> OpenAIEmbeddingResponse:
    """OpenAI-compatible embeddings; passages by default, queries with `input_type` or `:query`."""
    name, input_type = body.model, body.input_type
    for suffix, kind in QUERY_SUFFIXES.items():
        if name.endswith(suffix):
            name, input_type = name[: -len(suffix)], input_type or kind
    texts = [body.input] if isinstance(body.input, str) else body.input
    source = resolve_source(session, tenant, registry, name)
    session.commit()
    encoded = models.encode(source, texts, input_type or "passage")
    dim = int(encoded.vectors.shape[1])
    if body.dimensions is not None and body.dimensions != dim:
        raise InvalidRequest(
            f"dimensions: model {name} embeds in {dim} dimensions", field="dimensions"
        )
    data = [
        OpenAIEmbedding(
            index=i,
            embedding=base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
            if body.encoding_format == "base64"
            else row.tolist(),
        )
        for i, row in enumerate(encoded.vectors)
    ]
    usage = OpenAIUsage(prompt_tokens=encoded.tokens, total_tokens=encoded.tokens)
    return OpenAIEmbeddingResponse(data=data, model=body.model, usage=usage)
