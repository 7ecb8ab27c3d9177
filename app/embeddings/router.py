"""Embedding routes: Tailor's /v1/embed and the OpenAI-compatible /v1/embeddings.

Both are async: a request is validated and tokenized on the event loop (larger ones on a worker
thread), its rows wait for a micro-batch on the model's queue (app.embeddings.batching), and the
answer is serialised straight from the float32 rows.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from app.db.models import Tenant
from app.db.session import transaction
from app.deps import RegistryDep, ServingTenant, SettingsDep
from app.embeddings.openai_compat import OpenAIRoute, decode_token_ids
from app.embeddings.schemas import (
    EmbedRequest,
    EmbedResponse,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    OpenAIError,
)
from app.embeddings.service import (
    EmbeddingModels,
    ModelSource,
    ServedStudent,
    Tokenized,
    base_source,
    resolve_source,
)
from app.errors import InvalidRequest, NotFound, Unauthorized, Unavailable, responses
from app.models.tenant_models import is_tenant_model
from app.settings import Settings
from ml_core.registry import ModelRegistry

router = APIRouter(prefix="/v1", tags=["embeddings"])
openai_router = APIRouter(prefix="/v1", tags=["embeddings"], route_class=OpenAIRoute)

QUERY_SUFFIXES = {":query": "query", ":passage": "passage"}
# Requests with more characters than this are tokenized on a worker thread, not the event loop.
INLINE_TOKENIZE_CHARS = 4_096


async def _models(request: Request) -> EmbeddingModels:
    return request.app.state.embedding_models


ModelsDep = Annotated[EmbeddingModels, Depends(_models)]
ERRORS = responses(Unauthorized, NotFound, InvalidRequest, Unavailable)
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {**entry, "model": OpenAIError} for status, entry in ERRORS.items()
}


def _json(payload: dict[str, Any]) -> Response:
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")


def check_count(count: int, settings: Settings, field: str) -> None:
    """422 when a request holds more inputs than `embed_max_inputs`."""
    if count > settings.embed_max_inputs:
        raise InvalidRequest(f"{field}: {count} inputs; at most {settings.embed_max_inputs} per "
                             "request (embed_max_inputs)", field=field)


async def source_for(request: Request, tenant: Tenant, registry: ModelRegistry,
                     model: str) -> ModelSource:
    """The model's source. A base model is found on the event loop; a tenant model's row is
    read on a worker thread in a transaction of its own, closed before the request waits for
    its batch, so no request holds a database connection while it waits."""
    if is_tenant_model(model):
        def resolve() -> ModelSource:
            with transaction(request.app.state.session_factory) as session:
                return resolve_source(session, tenant, registry, model)

        return await run_in_threadpool(resolve)
    return base_source(registry, model)


async def embed_texts(
    models: EmbeddingModels, source: ModelSource, texts: Sequence[str], input_type: str,
    truncate: bool, dimensions: int | None, field: str,
) -> tuple[np.ndarray, Tokenized]:
    """Vectors of `texts` (float32 rows, `dimensions` applied) and their tokenization."""
    served = await models.served(source)
    if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
        tokenized = served.tokenize(list(texts), input_type)
    else:
        tokenized = await run_in_threadpool(served.tokenize, list(texts), input_type)
    if tokenized.truncated and not truncate:
        index = tokenized.truncated[0]
        raise InvalidRequest(
            f"{field}[{index}] is longer than the model's limit of {served.max_tokens} tokens "
            f"({len(tokenized.truncated)} input(s) are); send truncate=true to cut it",
            field=f"{field}.{index}")
    vectors = await models.embed(served, source, tokenized)
    return shorten(vectors, served, dimensions, field="dimensions"), tokenized


def shorten(vectors: np.ndarray, served: ServedStudent, dimensions: int | None,
            field: str) -> np.ndarray:
    """The first `dimensions` components, re-normalised for a normalising model; 422 unless
    the model was trained to be truncated (Matryoshka) or `dimensions` is its own."""
    dim = int(vectors.shape[1])
    if dimensions is None or dimensions == dim:
        return vectors
    spec = served.student.spec
    if not spec.matryoshka_dims:
        raise InvalidRequest(
            f"{field}: model {spec.name} embeds in {dim} dimensions and was not trained to be "
            "truncated (no matryoshka_dims in its spec)", field=field)
    if dimensions > dim:
        raise InvalidRequest(f"{field}: at most {dim} for model {spec.name}", field=field)
    cut = vectors[:, :dimensions]
    if spec.normalize:
        cut = cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(cut, dtype=np.float32)


@router.post("/embed", response_model=EmbedResponse, responses=ERRORS)
async def embed(
    body: EmbedRequest,
    request: Request,
    tenant: ServingTenant,
    registry: RegistryDep,
    models: ModelsDep,
    settings: SettingsDep,
) -> Response:
    """Embed queries or passages with a base or tuned model."""
    check_count(len(body.inputs), settings, "inputs")
    source = await source_for(request, tenant, registry, body.model)
    vectors, tokenized = await embed_texts(models, source, body.inputs, body.input_type,
                                           body.truncate, body.dimensions, "inputs")
    return _json({
        "model": body.model,
        "data": [{"index": i, "embedding": row} for i, row in enumerate(vectors)],
        "dim": int(vectors.shape[1]),
        "tokens": tokenized.tokens,
        "truncated": len(tokenized.truncated),
    })


@openai_router.post(
    "/embeddings", response_model=OpenAIEmbeddingResponse, responses=OPENAI_ERRORS
)
async def create_embeddings(
    body: OpenAIEmbeddingRequest,
    request: Request,
    tenant: ServingTenant,
    registry: RegistryDep,
    models: ModelsDep,
    settings: SettingsDep,
) -> Response:
    """OpenAI-compatible embeddings; passages by default, queries with `input_type` or `:query`.
    Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""
    name, input_type = body.model, body.input_type
    for suffix, kind in QUERY_SUFFIXES.items():
        if name.endswith(suffix):
            name, input_type = name[: -len(suffix)], input_type or kind
    raw = body.input
    if isinstance(raw, str):
        texts: list[str] = [raw]
    elif raw and isinstance(raw[0], int):
        texts = decode_token_ids([raw])  # type: ignore[list-item]
    elif raw and isinstance(raw[0], list):
        check_count(len(raw), settings, "input")
        texts = await run_in_threadpool(decode_token_ids, raw)
    else:
        texts = raw  # type: ignore[assignment]
    check_count(len(texts), settings, "input")
    source = await source_for(request, tenant, registry, name)
    vectors, tokenized = await embed_texts(models, source, texts, input_type or "passage",
                                           body.truncate, body.dimensions, "input")
    if body.encoding_format == "base64":
        data: list[dict[str, Any]] = [
            {"object": "embedding", "index": i,
             "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")}
            for i, row in enumerate(vectors)
        ]
    else:
        data = [{"object": "embedding", "index": i, "embedding": row}
                for i, row in enumerate(vectors)]
    return _json({
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokenized.tokens, "total_tokens": tokenized.tokens},
        "truncated": len(tokenized.truncated),
    })
