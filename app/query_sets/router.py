"""Query set routes: upload, list, read, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request, status
from starlette.concurrency import run_in_threadpool

from app.db.models import QuerySet
from app.deps import CurrentTenant, PageDep, SessionDep, SettingsDep, StoreDep
from app.errors import (
    InvalidQuerySet,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ResourceInUse,
    StorageQuotaExceeded,
    Unauthorized,
    responses,
)
from app.query_sets import service
from app.query_sets.schemas import QUERY_SET_UPLOAD_BODY, QuerySetList, QuerySetRead
from app.quotas import check_storage
from app.storage import delete_objects
from app.uploads import UploadRules, form_text, multipart_form, spool, upload_folder

router = APIRouter(prefix="/v1/query-sets", tags=["query sets"])


@router.post(
    "",
    response_model=QuerySetRead,
    status_code=status.HTTP_201_CREATED,
    openapi_extra={"requestBody": QUERY_SET_UPLOAD_BODY},
    responses=responses(
        Unauthorized, StorageQuotaExceeded, NotFound, PayloadTooLarge, InvalidQuerySet,
        InvalidRequest,
    ),
)
async def create_query_set(
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    store: StoreDep,
) -> QuerySet:
    """Upload your users' own queries for a corpus, without judgements (multipart `corpus_id`,
    `queries` JSONL), e.g. from a search log. A job given the set (`query_set_id`) trains on
    them beside its synthetic queries."""
    # Give the database connection back while the body streams in (see eval sets).
    await run_in_threadpool(session.commit)
    rules = UploadRules.of(settings, InvalidQuerySet)
    async with (
        upload_folder(settings.upload_dir) as folder,
        multipart_form(request, rules.max_bytes) as form,
    ):
        corpus_id = form_text(form, "corpus_id", required=True, max_length=64)
        name = form_text(form, "name")
        queries = await spool(form, "queries", folder, "queries.jsonl", rules)
        await run_in_threadpool(check_storage, session, tenant, settings, queries.size)
        return await run_in_threadpool(
            service.create_query_set, session, store, tenant, corpus_id, name, queries
        )


@router.get("", response_model=QuerySetList, responses=responses(Unauthorized, InvalidRequest))
def list_query_sets(session: SessionDep, tenant: CurrentTenant, page: PageDep) -> QuerySetList:
    """List the tenant's query sets, newest first."""
    rows, count = service.list_query_sets(session, tenant, page)
    return QuerySetList(data=[QuerySetRead.model_validate(row) for row in rows], count=count)


@router.get(
    "/{query_set_id}",
    response_model=QuerySetRead,
    responses=responses(Unauthorized, NotFound, InvalidRequest),
)
def get_query_set(query_set_id: str, session: SessionDep, tenant: CurrentTenant) -> QuerySet:
    """Read one query set."""
    return service.get_query_set(session, tenant, query_set_id)


@router.delete(
    "/{query_set_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=responses(Unauthorized, NotFound, ResourceInUse, InvalidRequest),
)
def delete_query_set(
    query_set_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep
) -> None:
    """Delete a query set and its stored files; 409 (naming them in `job_ids`) while a job that
    uses it has not finished."""
    row = service.delete_query_set(session, tenant, query_set_id)
    session.commit()
    delete_objects(store, service.query_set_prefix(row.id))
