"""Model routes: upload, list, read, rename, delete, download."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import MalformedRangeHeader
from starlette.responses import RangeNotSatisfiable as StarletteRangeNotSatisfiable

from app.deps import CurrentTenant, PageDep, RegistryDep, SessionDep, SettingsDep, StoreDep
from app.errors import (
    InvalidModel,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RangeNotSatisfiable,
    ResourceInUse,
    StorageQuotaExceeded,
    Unauthorized,
    responses,
)
from app.metadata import METADATA_FILTER_PARAMETER, metadata_filter
from app.models import service
from app.models.onnx_archive import ensure_onnx_archive
from app.models.schemas import ModelList, ModelRead, ModelUpdate
from app.models.tenant_models import model_keys
from app.models.upload import MODEL_UPLOAD_BODY, create_uploaded_model
from app.quotas import check_storage
from app.storage import ObjectNotFound
from app.uploads import UploadRules, form_text, multipart_form, spool, upload_folder

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, responses=responses(Unauthorized, InvalidRequest),
            openapi_extra={"parameters": [METADATA_FILTER_PARAMETER]})
def list_models(
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    registry: RegistryDep,
    page: PageDep,
    name: Annotated[str | None, Query(max_length=200, description="Only models of this name.")]
    = None,
) -> ModelList:
    """List the base models on offer and the tenant's own models (tuned and uploaded);
    `?name=` and `?metadata[key]=value` filter them."""
    wanted = metadata_filter(request.query_params)
    rows, count = service.list_models(session, tenant, registry, page, name, wanted)
    return ModelList(data=rows, count=count)


@router.post(
    "",
    response_model=ModelRead,
    status_code=status.HTTP_201_CREATED,
    openapi_extra={"requestBody": MODEL_UPLOAD_BODY},
    responses=responses(
        Unauthorized, StorageQuotaExceeded, PayloadTooLarge, InvalidModel, InvalidRequest
    ),
)
async def upload_model(
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    store: StoreDep,
) -> ModelRead:
    """Upload your own base model: a sentence-transformers folder as .tar.gz (multipart `file`,
    optional `name`). It is checked (safe archive, safetensors weights only, config, tokenizer,
    pooling, a test encode) before it is accepted; then its `mdl_` id works on every embedding
    route, for bulk embedding, and as a job's `base_model`."""
    await run_in_threadpool(session.commit)  # no connection held while the body streams in
    rules = UploadRules.archive(settings.model_upload_max_bytes, InvalidModel)
    async with (
        upload_folder(settings.upload_dir) as folder,
        multipart_form(request, rules.max_bytes) as form,
    ):
        name = form_text(form, "name")
        upload = await spool(form, "file", folder, "model.tar", rules)
        await run_in_threadpool(check_storage, session, tenant, settings, upload.size)
        model = await run_in_threadpool(create_uploaded_model, session, store, tenant, upload,
                                        name, settings)
    return service.uploaded_read(model)


@router.get(
    "/{model_id}",
    response_model=ModelRead,
    responses=responses(Unauthorized, NotFound, InvalidRequest),
)
def get_model(
    model_id: str, session: SessionDep, tenant: CurrentTenant, registry: RegistryDep
) -> ModelRead:
    """Read one of your models (`mdl_...`, tuned or uploaded) or a base model (by name)."""
    return service.get_model(session, tenant, registry, model_id)


@router.patch(
    "/{model_id}",
    response_model=ModelRead,
    responses=responses(Unauthorized, NotFound, InvalidRequest),
)
def update_model(
    model_id: str, update: ModelUpdate, session: SessionDep, tenant: CurrentTenant
) -> ModelRead:
    """Rename one of your models (tuned or uploaded) or replace its metadata."""
    model = service.update_model(service.get_tenant_model(session, tenant, model_id), update)
    session.flush()
    return service.tenant_read(model)


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=responses(Unauthorized, NotFound, ResourceInUse, InvalidRequest),
)
def delete_model(
    model_id: str, request: Request, session: SessionDep, tenant: CurrentTenant, store: StoreDep
) -> None:
    """Delete one of your models (tuned or uploaded): its archives (the ONNX one too) and this
    server's loaded and unpacked copies go; 409 while a job that uses it has not finished.
    The job that tuned it stays."""
    model = service.get_tenant_model(session, tenant, model_id)
    service.delete_model(session, tenant, model)
    session.commit()
    request.app.state.embedding_models.forget(model_id)
    try:
        store.delete_prefix(model_keys(model_id)[0].rpartition("/")[0] + "/")
    except Exception:  # the row is gone: nothing can reach these objects any more
        log.exception("could not delete the objects of model %s", model_id)


DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
        "description": "The sentence-transformers folder as .tar.gz (local object store).",
    },
    206: {
        "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
        "description": "The bytes a `Range: bytes=...` header asked for (local object store).",
    },
    307: {"description": "Redirect to a time-limited S3 URL of the .tar.gz."},
    **responses(Unauthorized, NotFound, RangeNotSatisfiable, InvalidRequest),
}


class ArchiveResponse(FileResponse):
    """A file with HEAD and Range from Starlette, its range errors in the API's terms: a
    malformed Range is ignored (the whole file, as RFC 9110 asks), one past the end is a 416
    in the one error shape."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []
        except StarletteRangeNotSatisfiable:
            raise RangeNotSatisfiable(
                f"the archive has {file_size} bytes: the Range asks for bytes past its end",
                headers={"Content-Range": f"bytes */{file_size}"}, size=file_size,
            ) from None


@router.get(
    "/{model_id}/download",
    response_class=FileResponse,
    response_model=None,
    responses=DOWNLOAD_RESPONSES,
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
    """Download one of your models (tuned or uploaded) as a .tar.gz sentence-transformers folder
    (with `?onnx=true`, an ONNX export of it inside too). The embedded store serves byte ranges
    (`Range: bytes=0-1023`), so an interrupted download can resume; with S3 the redirect's URL
    does."""
    if not model_id.startswith(service.TUNED_PREFIX):
        raise NotFound(
            f"model {model_id} is a base model: only tuned models can be downloaded",
            resource="model", id=model_id,
        )
    model = service.get_tenant_model(session, tenant, model_id)
    key = model.object_key
    if onnx:
        session.commit()  # no connection held while the export runs
        if not store.exists(model.object_key):
            raise NotFound(f"model {model_id} has no archive", resource="model", id=model_id)
        key = ensure_onnx_archive(store, model, Path(settings.embed_cache_dir) / "onnx")
    url = store.presigned_url(key, settings.presigned_url_expires)
    if url is not None:
        return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    try:
        path = store.local_path(key)
    except ObjectNotFound:
        raise NotFound(f"model {model_id} has no archive", resource="model", id=model_id) from None
    assert path is not None  # a store that cannot sign URLs is a local folder
    filename = f"{model.id}-onnx.tar.gz" if onnx else f"{model.id}.tar.gz"
    # Starlette answers HEAD, Range (206) and conditional requests from the file.
    return ArchiveResponse(path, media_type="application/gzip", filename=filename)


router.add_api_route(
    "/{model_id}/download",
    download_model,
    methods=["HEAD"],
    name="head_model_download",
    response_class=FileResponse,
    response_model=None,
    responses=DOWNLOAD_RESPONSES,
    summary="Head Model Download",
    description="The download's headers without its body: size (`Content-Length`), "
    "`Accept-Ranges`, `ETag` and `Last-Modified` on the embedded store; the redirect with S3.",
)
