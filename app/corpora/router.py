"""Corpus routes: upload, list, read, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from starlette.concurrency import run_in_threadpool

from app.corpora import service
from app.corpora.schemas import CORPUS_UPLOAD_BODY, CorpusList, CorpusRead
from app.db.models import Corpus
from app.deps import CurrentTenant, PageDep, SessionDep, SettingsDep, StoreDep
from app.errors import (
    InvalidCorpus,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ResourceInUse,
    StorageQuotaExceeded,
    Unauthorized,
    responses,
)
from app.jobs import queue
from app.quotas import check_storage
from app.uploads import UploadRules, form_text, multipart_form, spool, upload_folder

router = APIRouter(prefix="/v1/corpora", tags=["corpora"])


@router.post(
    "",
    response_model=CorpusRead,
    status_code=status.HTTP_201_CREATED,
    openapi_extra={"requestBody": CORPUS_UPLOAD_BODY},
    responses=responses(
        Unauthorized, StorageQuotaExceeded, PayloadTooLarge, InvalidCorpus, InvalidRequest
    ),
)
async def create_corpus(
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    store: StoreDep,
) -> Corpus:
    """Upload a BEIR corpus (multipart `file`, optional `name`); every line is validated."""
    # Authenticated: give the database connection back while the body streams in, so slow
    # uploads do not hold the pool's connections (and PostgreSQL transactions) for minutes.
    await run_in_threadpool(session.commit)
    rules = UploadRules.of(settings, InvalidCorpus)
    async with (
        upload_folder(settings.upload_dir) as folder,
        multipart_form(request, rules.max_bytes) as form,
    ):
        name = form_text(form, "name")
        upload = await spool(form, "file", folder, "corpus.jsonl", rules)
        await run_in_threadpool(check_storage, session, tenant, settings, upload.size)
        return await run_in_threadpool(service.create_corpus, session, store, tenant, upload, name)


@router.get("", response_model=CorpusList, responses=responses(Unauthorized, InvalidRequest))
def list_corpora(session: SessionDep, tenant: CurrentTenant, page: PageDep) -> CorpusList:
    """List the tenant's corpora, newest first."""
    rows, count = service.list_corpora(session, tenant, page)
    return CorpusList(data=[CorpusRead.model_validate(row) for row in rows], count=count)


@router.get(
    "/{corpus_id}",
    response_model=CorpusRead,
    responses=responses(Unauthorized, NotFound, InvalidRequest),
)
def get_corpus(corpus_id: str, session: SessionDep, tenant: CurrentTenant) -> Corpus:
    """Read one corpus."""
    return service.get_corpus(session, tenant, corpus_id)


@router.delete(
    "/{corpus_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=responses(Unauthorized, NotFound, ResourceInUse, InvalidRequest),
)
def delete_corpus(
    corpus_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    store: StoreDep,
    cascade: Annotated[bool, Query(description="Cancel the jobs not yet finished that use "
                                   "the corpus instead of refusing.")] = False,
) -> None:
    """Delete a corpus, its stored file, and the eval and query sets built on it. While a job
    that uses it has not finished: 409 naming them (`job_ids`), or with `?cascade=true` they
    are cancelled first. Finished jobs and their tuned models stay."""
    deletion = service.delete_corpus(session, tenant, corpus_id, cascade=cascade)
    session.commit()
    for task_id in deletion.revoke:
        queue.revoke_task(task_id)
    service.delete_corpus_objects(store, deletion)
