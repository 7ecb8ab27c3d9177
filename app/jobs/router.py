"""Job routes: create, list, read, rename, delete, events, cancel, report (JSON and page)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from app.db.models import FINISHED_JOB_STATUSES, AnyJob, Job
from app.deps import CurrentTenant, PageDep, RegistryDep, SessionDep, SettingsDep, StoreDep
from app.errors import (
    IdempotencyConflict,
    InvalidRecipe,
    InvalidRequest,
    InvalidState,
    NotFound,
    QuotaExceeded,
    Unauthorized,
    UnknownModel,
    responses,
)
from app.jobs import lifecycle, queue, retention, service
from app.jobs.schemas import (
    JobCreate,
    JobEventList,
    JobEventRead,
    JobList,
    JobRead,
    JobReport,
    JobUpdate,
)
from app.logs import bind
from app.metadata import METADATA_FILTER_PARAMETER, metadata_filter
from app.reports import render_report_html, report_csp
from app.storage import ObjectStore

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# Event ids are 64-bit integers: no larger cursor can match anything.
MAX_EVENT_ID = 2**63 - 1

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Retry-safe creation: the same key and body return the same job.",
    ),
]


@router.post(
    "",
    response_model=JobRead,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": JobRead, "description": "The job an earlier request with this "
              "Idempotency-Key created."},
        **responses(
            Unauthorized, NotFound, IdempotencyConflict, InvalidRecipe, UnknownModel,
            InvalidRequest, QuotaExceeded,
        ),
    },
)
def create_job(
    request: JobCreate,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    registry: RegistryDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> Job:
    """Start a specialization job on a corpus; it is queued, then run stage by stage."""
    job, created = service.create_job(
        session, tenant, request, registry, idempotency_key, settings.max_concurrent_jobs,
        (settings.generation_backend, settings.generation_endpoint, settings.generation_model),
    )
    bind(job_id=job.id)
    if not created:
        response.status_code = status.HTTP_200_OK
        return job
    # The worker must find the committed row, and a rolled-back job must never be sent.
    session.commit()
    try:
        job.celery_task_id = queue.enqueue_first_stage(job.id)
    except Exception as exc:
        log.exception("could not enqueue job %s", job.id)
        lifecycle.fail_enqueue(session, job, exc)
    return job


@router.get("", response_model=JobList, responses=responses(Unauthorized, InvalidRequest),
            openapi_extra={"parameters": [METADATA_FILTER_PARAMETER]})
def list_jobs(
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    page: PageDep,
    name: Annotated[str | None, Query(max_length=200, description="Only jobs of this name.")]
    = None,
) -> JobList:
    """List the tenant's jobs, newest first; `?name=` and `?metadata[key]=value` filter them."""
    wanted = metadata_filter(request.query_params)
    rows, count = service.list_jobs(session, tenant, page, name, wanted)
    return JobList(data=[JobRead.model_validate(row) for row in rows], count=count)


@router.get(
    "/{job_id}", response_model=JobRead, responses=responses(Unauthorized, NotFound, InvalidRequest)
)
def get_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> Job:
    """Read a job: status, stage, progress, metrics, error, tuned model and recommendation."""
    return service.get_job(session, tenant, job_id)


@router.patch(
    "/{job_id}", response_model=JobRead, responses=responses(Unauthorized, NotFound, InvalidRequest)
)
def update_job(job_id: str, update: JobUpdate, session: SessionDep, tenant: CurrentTenant) -> Job:
    """Rename a job or replace its metadata (fields left out keep their values)."""
    return service.update_job(service.get_job(session, tenant, job_id), update)


def cancel_and_revoke(session: Session, job: AnyJob) -> AnyJob:
    """Cancel a job of either kind and revoke its queued task once the cancel is committed."""
    job, task_id = service.cancel_job(session, job)
    session.commit()
    if task_id is not None:
        queue.revoke_task(task_id)
    return job


# The events routes of both kinds of job: poll with `after` = the last id seen.
EventsAfter = Annotated[
    int | None, Query(ge=0, le=MAX_EVENT_ID, description="Only events with a larger id.")
]
EventsLimit = Annotated[int, Query(ge=1, le=1000)]


def events_page(session: Session, job: AnyJob, after: int | None, limit: int) -> JobEventList:
    rows, count = service.list_events(session, job, after, limit)
    return JobEventList(data=[JobEventRead.model_validate(row) for row in rows], count=count)


def delete_any_job(session: Session, store: ObjectStore, job: AnyJob) -> None:
    """Delete a job of either kind (app.jobs.service.delete_job), revoke its queued task, and
    remove its objects now if it has stopped (else the workers' sweep does once it stops)."""
    task_id = service.delete_job(session, job)
    session.commit()
    if task_id is not None:
        queue.revoke_task(task_id)
    if job.status in FINISHED_JOB_STATUSES:
        try:
            retention.purge_job_objects(store, session, job)
            session.commit()
        except Exception:  # the sweep tries again
            log.exception("could not remove the objects of deleted job %s", job.id)
            session.rollback()


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=responses(Unauthorized, NotFound, InvalidRequest),
)
def delete_job(job_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> None:
    """Delete a job: a queued or running one is cancelled first; its stage outputs and report
    go with it (at once, or once a running stage has stopped). A tuned model it produced
    stays: delete it with DELETE /v1/models/{id}."""
    delete_any_job(session, store, service.get_job(session, tenant, job_id))


@router.get(
    "/{job_id}/events",
    response_model=JobEventList,
    responses=responses(Unauthorized, NotFound, InvalidRequest),
)
def list_job_events(
    job_id: str,
    session: SessionDep,
    tenant: CurrentTenant,
    after: EventsAfter = None,
    limit: EventsLimit = 100,
) -> JobEventList:
    """List a job's events oldest first; poll with `after` = the last id seen."""
    return events_page(session, service.get_job(session, tenant, job_id), after, limit)


@router.post(
    "/{job_id}/cancel",
    response_model=JobRead,
    responses=responses(Unauthorized, NotFound, InvalidState, InvalidRequest),
)
def cancel_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> Job:
    """Cancel a job: a queued job stops at once, a running one at its next progress report."""
    return cancel_and_revoke(session, service.get_job(session, tenant, job_id))  # type: ignore[return-value]


@router.get(
    "/{job_id}/report",
    response_model=JobReport,
    response_model_exclude_unset=True,  # the report as written: no fields of a later layout
    responses=responses(Unauthorized, NotFound, InvalidState, InvalidRequest),
)
def get_job_report(
    job_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep
) -> dict[str, Any]:
    """Read the evaluation report (base vs tuned, per query type) of a succeeded job."""
    return service.load_report(store, service.get_job(session, tenant, job_id))


# The page loads nothing (inline SVG, its own stylesheet pinned by hash) and may not be framed.
REPORT_PAGE_HEADERS = {
    "Content-Security-Policy": report_csp() + "; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@router.get(
    "/{job_id}/report.html",
    # A plain Response class keeps the error responses documented as JSON (their real type).
    response_class=Response,
    response_model=None,
    responses={
        200: {"content": {"text/html": {"schema": {"type": "string"}}},
              "description": "A self-contained HTML page: no scripts, nothing fetched."},
        **responses(Unauthorized, NotFound, InvalidState, InvalidRequest),
    },
)
def get_job_report_page(
    job_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep
) -> HTMLResponse:
    """The evaluation report as a page: recommendation, base vs tuned with its interval,
    per-query gains, per query type, dev loss per epoch, teacher check, warnings, recipe."""
    inputs = service.report_page_inputs(store, service.get_job(session, tenant, job_id))
    return HTMLResponse(render_report_html(**inputs), headers=REPORT_PAGE_HEADERS)
