"""Bulk embedding job routes: create, list, read, rename, delete, events, cancel, files,
download."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse

from app.db.models import EmbeddingJob
from app.deps import CurrentTenant, PageDep, RegistryDep, SessionDep, SettingsDep, StoreDep
from app.embedding_jobs import service
from app.embedding_jobs.schemas import (
    EmbeddingFile,
    EmbeddingFileList,
    EmbeddingJobCreate,
    EmbeddingJobList,
    EmbeddingJobRead,
)
from app.errors import (
    InvalidRequest,
    InvalidState,
    NotFound,
    QuotaExceeded,
    Unauthorized,
    UnknownModel,
    responses,
)
from app.jobs import lifecycle, queue
from app.jobs import service as jobs
from app.jobs.router import (
    EventsAfter,
    EventsLimit,
    cancel_and_revoke,
    delete_any_job,
    events_page,
)
from app.jobs.schemas import JobEventList, JobUpdate
from app.metadata import METADATA_FILTER_PARAMETER, metadata_filter

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/embedding-jobs", tags=["embedding-jobs"])
READ_ERRORS = responses(Unauthorized, NotFound, InvalidRequest)
BINARY = {"schema": {"type": "string", "format": "binary"}}


@router.post(
    "",
    response_model=EmbeddingJobRead,
    status_code=status.HTTP_201_CREATED,
    responses=responses(Unauthorized, NotFound, UnknownModel, InvalidRequest, QuotaExceeded),
)
def create_embedding_job(
    request: EmbeddingJobCreate,
    session: SessionDep,
    tenant: CurrentTenant,
    registry: RegistryDep,
    settings: SettingsDep,
) -> EmbeddingJob:
    """Embed a stored corpus with a base or own model on the workers; the vectors are stored in
    shards (float32 .npy plus the rows' ids as JSON lines) to list and download."""
    job = service.create_embedding_job(session, tenant, request, registry, settings)
    # The worker must find the committed row, and a rolled-back job must never be sent.
    session.commit()
    try:
        job.celery_task_id = queue.enqueue_embedding(job.id)
    except Exception as exc:
        log.exception("could not enqueue embedding job %s", job.id)
        lifecycle.fail_enqueue(session, job, exc, stage="embed")
    return job


@router.get("", response_model=EmbeddingJobList,
            responses=responses(Unauthorized, InvalidRequest),
            openapi_extra={"parameters": [METADATA_FILTER_PARAMETER]})
def list_embedding_jobs(
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    page: PageDep,
    name: Annotated[str | None, Query(max_length=200, description="Only jobs of this name.")]
    = None,
) -> EmbeddingJobList:
    """List the tenant's bulk embedding jobs, newest first; `?name=` and
    `?metadata[key]=value` filter them."""
    wanted = metadata_filter(request.query_params)
    rows, count = service.list_embedding_jobs(session, tenant, page, name, wanted)
    return EmbeddingJobList(data=[EmbeddingJobRead.model_validate(row) for row in rows],
                            count=count)


@router.get("/{job_id}", response_model=EmbeddingJobRead, responses=READ_ERRORS)
def get_embedding_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> EmbeddingJob:
    """Read a bulk embedding job: status, progress, counts, error."""
    return service.get_embedding_job(session, tenant, job_id)


@router.patch("/{job_id}", response_model=EmbeddingJobRead, responses=READ_ERRORS)
def update_embedding_job(
    job_id: str, update: JobUpdate, session: SessionDep, tenant: CurrentTenant
) -> EmbeddingJob:
    """Rename a bulk embedding job or replace its metadata (fields left out keep theirs)."""
    return jobs.update_job(service.get_embedding_job(session, tenant, job_id), update)  # type: ignore[return-value]


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, responses=READ_ERRORS)
def delete_embedding_job(
    job_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep
) -> None:
    """Delete a bulk embedding job and its stored vectors; a queued or running one is cancelled
    first (its shards go once it has stopped)."""
    delete_any_job(session, store, service.get_embedding_job(session, tenant, job_id))


@router.get("/{job_id}/events", response_model=JobEventList, responses=READ_ERRORS)
def list_embedding_job_events(
    job_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    after: EventsAfter = None,
    limit: EventsLimit = 100,
) -> JobEventList:
    """List a bulk embedding job's events oldest first; poll with `after` = the last id seen."""
    return events_page(session, service.get_embedding_job(session, tenant, job_id), after, limit)


@router.post(
    "/{job_id}/cancel",
    response_model=EmbeddingJobRead,
    responses=responses(Unauthorized, NotFound, InvalidState, InvalidRequest),
)
def cancel_embedding_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> EmbeddingJob:
    """Cancel a bulk embedding job: a queued one stops at once, a running one at its next
    progress report (shards already stored stay listed)."""
    return cancel_and_revoke(session, service.get_embedding_job(session, tenant, job_id))  # type: ignore[return-value]


@router.get("/{job_id}/files", response_model=EmbeddingFileList, responses=READ_ERRORS)
def list_embedding_files(
    job_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep
) -> EmbeddingFileList:
    """List the job's stored files: the manifest and each finished shard's vectors and ids
    (shards appear as they finish, so ingestion can start before the job ends)."""
    job = service.get_embedding_job(session, tenant, job_id)
    files, complete = service.stored_files(store, job)
    data = [
        EmbeddingFile(name=f.name, kind=f.kind, shard=f.shard, rows=f.rows, size=f.size,
                      sha256=f.sha256, url=f"/v1/embedding-jobs/{job.id}/files/{f.name}")
        for f in files
    ]
    return EmbeddingFileList(data=data, count=len(data), complete=complete)


FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": BINARY, "application/json": BINARY},
          "description": "The file (local object store)."},
    307: {"description": "Redirect to a time-limited S3 URL of the file."},
    **READ_ERRORS,
}


@router.get("/{job_id}/files/{name}", response_class=StreamingResponse, response_model=None,
            responses=FILE_RESPONSES)
def download_embedding_file(
    job_id: str, name: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep,
    settings: SettingsDep,
) -> Response:
    """Download one stored file: `manifest.json`, `vectors-<k>.npy` or `ids-<k>.jsonl`."""
    job = service.get_embedding_job(session, tenant, job_id)
    key = service.file_key(store, job, name)
    url = store.presigned_url(key, settings.presigned_url_expires)
    if url is not None:
        return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    media = "application/json" if name.endswith(".json") else (
        "application/x-ndjson" if name.endswith(".jsonl") else "application/octet-stream")
    return StreamingResponse(
        service.stream_file(store, key), media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{name}"',
                 "Content-Length": str(store.size(key))},
    )


@router.get(
    "/{job_id}/download",
    response_class=StreamingResponse,
    response_model=None,
    responses={
        200: {"content": {"application/x-tar": BINARY},
              "description": "Every file of the job as an uncompressed tar, in a folder named "
              "after the job."},
        **responses(Unauthorized, NotFound, InvalidState, InvalidRequest),
    },
)
def download_embeddings(
    job_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep
) -> Response:
    """Download a succeeded job's vectors, ids and manifest in one tar (streamed)."""
    job = service.get_embedding_job(session, tenant, job_id)
    service.require_succeeded(job)
    files, _ = service.stored_files(store, job)
    members = service.tar_members(job, files)
    session.commit()  # no connection held while the archive streams
    return StreamingResponse(
        service.stream_tar(store, members),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{job.id}.tar"',
                 "Content-Length": str(service.tar_size(members))},
    )
