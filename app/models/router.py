"""Model routes: list, read, download."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse

from app.deps import CurrentTenant, PageDep, RegistryDep, SessionDep, SettingsDep, StoreDep
from app.errors import InvalidRequest, NotFound, Unauthorized, responses
from app.models import service
from app.models.onnx_archive import ensure_onnx_archive
from app.models.schemas import ModelList, ModelRead
from app.storage import ObjectStore

router = APIRouter(prefix="/v1/models", tags=["models"])

CHUNK = 1024 * 1024


@router.get("", response_model=ModelList, responses=responses(Unauthorized, InvalidRequest))
def list_models(
    session: SessionDep, tenant: CurrentTenant, registry: RegistryDep, page: PageDep
) -> ModelList:
    """List the base models on offer and the tenant's tuned models."""
    rows, count = service.list_models(session, tenant, registry, page)
    return ModelList(data=rows, count=count)


@router.get(
    "/{model_id}",
    response_model=ModelRead,
    responses=responses(Unauthorized, NotFound, InvalidRequest),
)
def get_model(
    model_id: str, session: SessionDep, tenant: CurrentTenant, registry: RegistryDep
) -> ModelRead:
    """Read a tuned model (`mdl_...`) or a base model (by name)."""
    return service.get_model(session, tenant, registry, model_id)


def _stream(store: ObjectStore, key: str) -> Iterator[bytes]:
    with store.open_stream(key) as stream:
        while chunk := stream.read(CHUNK):
            yield chunk


@router.get(
    "/{model_id}/download",
    response_class=StreamingResponse,
    response_model=None,
    responses={
        200: {
            "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The sentence-transformers folder as .tar.gz (local object store).",
        },
        307: {"description": "Redirect to a time-limited S3 URL of the .tar.gz."},
        **responses(Unauthorized, NotFound, InvalidRequest),
    },
)
def download_model(
    model_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    store: StoreDep,
    settings: SettingsDep,
    onnx: Annotated[bool, Query(description="Add `onnx/model.onnx`, an ONNX export with the "
                                "same vectors (built on the first request: seconds).")] = False,
) -> Response:
    """Download a tuned model as a .tar.gz sentence-transformers folder (with `?onnx=true`, an
    ONNX export of it inside too)."""
    if not model_id.startswith(service.TUNED_PREFIX):
        raise NotFound(
            f"model {model_id} is a base model: only tuned models can be downloaded",
            resource="model", id=model_id,
        )
    model = service.get_tuned(session, tenant, model_id)
    key = model.object_key
    if onnx:
        session.commit()  # no connection held while the export runs
        if not store.exists(model.object_key):
            raise NotFound(f"model {model_id} has no archive", resource="model", id=model_id)
        key = ensure_onnx_archive(store, model, Path(settings.embed_cache_dir) / "onnx")
    url = store.presigned_url(key, settings.presigned_url_expires)
    if url is not None:
        return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    if not store.exists(key):
        raise NotFound(f"model {model_id} has no archive", resource="model", id=model_id)
    filename = f"{model.id}-onnx.tar.gz" if onnx else f"{model.id}.tar.gz"
    return StreamingResponse(
        _stream(store, key),
        media_type="application/gzip",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Content-Length": str(store.size(key)),
        },
    )
