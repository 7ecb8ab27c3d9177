"""Eval set routes: upload, list, read, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request, status
from starlette.concurrency import run_in_threadpool

from app.db.models import EvalSet
from app.deps import CurrentTenant, PageDep, SessionDep, SettingsDep, StoreDep
from app.errors import (
    InvalidEvalSet,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ResourceInUse,
    StorageQuotaExceeded,
    Unauthorized,
    responses,
)
from app.eval_sets import service
from app.eval_sets.schemas import EVAL_SET_UPLOAD_BODY, EvalSetList, EvalSetRead
from app.quotas import check_storage
from app.storage import delete_objects
from app.uploads import UploadRules, form_text, multipart_form, spool, upload_folder

router = APIRouter(prefix="/v1/eval-sets", tags=["eval sets"])


@router.post(
    "",
    response_model=EvalSetRead,
    status_code=status.HTTP_201_CREATED,
    openapi_extra={"requestBody": EVAL_SET_UPLOAD_BODY},
    responses=responses(
        Unauthorized, StorageQuotaExceeded, NotFound, PayloadTooLarge, InvalidEvalSet,
        InvalidRequest,
    ),
)
async def create_eval_set(
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    store: StoreDep,
) -> EvalSet:
    """Upload judgements for a corpus (multipart `corpus_id`, `queries` JSONL, `qrels` TSV)."""
    # Authenticated: give the database connection back while the body streams in, so slow
    # uploads do not hold the pool's connections (and PostgreSQL transactions) for minutes.
    await run_in_threadpool(session.commit)
    rules = UploadRules.of(settings, InvalidEvalSet)
    async with (
        upload_folder(settings.upload_dir) as folder,
        multipart_form(request, rules.max_bytes) as form,
    ):
        corpus_id = form_text(form, "corpus_id", required=True, max_length=64)
        name = form_text(form, "name")
        queries = await spool(form, "queries", folder, "queries.jsonl", rules)
        qrels = await spool(form, "qrels", folder, "qrels.tsv", rules)
        size = queries.size + qrels.size
        await run_in_threadpool(check_storage, session, tenant, settings, size)
        return await run_in_threadpool(
            service.create_eval_set, session, store, tenant, corpus_id, name, queries, qrels
        )


@router.get("", response_model=EvalSetList, responses=responses(Unauthorized, InvalidRequest))
def list_eval_sets(session: SessionDep, tenant: CurrentTenant, page: PageDep) -> EvalSetList:
    """List the tenant's eval sets, newest first."""
    rows, count = service.list_eval_sets(session, tenant, page)
    return EvalSetList(data=[EvalSetRead.model_validate(row) for row in rows], count=count)


@router.get(
    "/{eval_set_id}",
    response_model=EvalSetRead,
    responses=responses(Unauthorized, NotFound, InvalidRequest),
)
def get_eval_set(eval_set_id: str, session: SessionDep, tenant: CurrentTenant) -> EvalSet:
    """Read one eval set."""
    return service.get_eval_set(session, tenant, eval_set_id)


@router.delete(
    "/{eval_set_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=responses(Unauthorized, NotFound, ResourceInUse, InvalidRequest),
)
def delete_eval_set(
    eval_set_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep
) -> None:
    """Delete an eval set and its stored files; 409 (naming them in `job_ids`) while a job that
    uses it has not finished."""
    row = service.delete_eval_set(session, tenant, eval_set_id)
    session.commit()
    delete_objects(store, service.eval_set_prefix(row.id))
