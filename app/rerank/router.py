"""POST /v1/rerank: order documents by relevance to a query, with a catalogued teacher."""

from __future__ import annotations

import uuid
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from app.deps import CurrentTenant, RegistryDep, ServingTenant, SettingsDep
from app.errors import InvalidRequest, NotFound, Unauthorized, Unavailable, responses
from app.rerank.schemas import (
    RerankModel,
    RerankModelList,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankResultDocument,
)
from app.rerank.service import Rerankers, get_teacher_spec, relevance

router = APIRouter(prefix="/v1/rerank", tags=["rerank"])


async def _rerankers(request: Request) -> Rerankers:
    return request.app.state.rerankers


RerankersDep = Annotated[Rerankers, Depends(_rerankers)]


@router.post("", response_model=RerankResponse,
             responses=responses(Unauthorized, NotFound, InvalidRequest, Unavailable))
async def rerank(
    body: RerankRequest,
    tenant: ServingTenant,
    registry: RegistryDep,
    rerankers: RerankersDep,
    settings: SettingsDep,
) -> RerankResponse:
    """Score each document against the query with a cross-encoder teacher; most relevant first.
    The shape of Cohere's and TEI's rerank (`query`, `documents`, `top_n`,
    `return_documents`)."""
    if len(body.documents) > settings.embed_max_inputs:
        raise InvalidRequest(f"documents: {len(body.documents)} documents; at most "
                             f"{settings.embed_max_inputs} per request (embed_max_inputs)",
                             field="documents")
    spec = get_teacher_spec(registry, body.model)
    teacher = rerankers.loaded(spec.name) or await run_in_threadpool(rerankers.teacher, spec)
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    raw = await rerankers.score(teacher, spec.name, body.query, texts)
    scores = raw if body.raw_scores else relevance(teacher, raw)
    order = np.argsort(-scores, kind="stable")[: body.top_n or len(texts)]
    return RerankResponse(
        id=str(uuid.uuid4()),
        model=body.model,
        results=[
            RerankResult(
                index=int(i), relevance_score=float(scores[i]),
                document=RerankResultDocument(text=texts[i]) if body.return_documents else None,
            )
            for i in order
        ],
    )


@router.get("/models", response_model=RerankModelList,
            responses=responses(Unauthorized))
def list_rerank_models(tenant: CurrentTenant, registry: RegistryDep) -> RerankModelList:
    """The teachers /v1/rerank serves."""
    data = [RerankModel(id=s.name, licence=s.licence or None, source=s.source or None)
            for s in registry.list("teacher")]
    return RerankModelList(data=data, count=len(data))
