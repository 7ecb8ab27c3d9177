"""Console job pages: the list with a form to start one, a job's live status and events, cancel,
and its report. Live parts are HTML fragments the page's small script polls (same origin)."""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, Response
from pydantic import ValidationError
from sqlalchemy import select

from app.console.web import (
    LIST_LIMIT,
    PREFIX,
    CurrentUser,
    check_csrf,
    explain_error,
    not_found,
    page,
    redirect,
)
from app.corpora.service import list_corpora
from app.db.base import utcnow
from app.db.models import ACTIVE_JOB_STATUSES, Job, JobEvent, JobStatus
from app.deps import Page, RegistryDep, SessionDep, SettingsDep, StoreDep
from app.errors import AppError, NotFound
from app.eval_sets.service import list_eval_sets
from app.jobs import service
from app.jobs.router import cancel_job, create_job
from app.jobs.schemas import JobCreate
from app.reports import report_fragment
from ml_core.config import PRESETS, QueryType
from ml_core.pipeline import STAGES

router = APIRouter(prefix=PREFIX + "/jobs", include_in_schema=False)

# Events shown on a job's page: the newest ones (a long training run logs thousands).
EVENTS_SHOWN = 100
# Tells the page's script whether to keep polling a live fragment.
LIVE_HEADER = "X-Console-Active"


def _active(job: Job) -> bool:
    return job.status in ACTIVE_JOB_STATUSES


def _stages(job: Job) -> list[dict[str, str]]:
    """Each pipeline stage as done / running / waiting (failed, cancelled) for the stage bar."""
    current = STAGES.index(job.stage) if job.stage in STAGES else -1
    out = []
    for i, name in enumerate(STAGES):
        if job.status == JobStatus.SUCCEEDED or i < current:
            state = "done"
        elif i == current:
            state = {JobStatus.FAILED: "failed", JobStatus.CANCELLED: "failed"}.get(
                job.status, "running")
        else:
            state = "waiting"
        out.append({"name": name, "state": state})
    return out


def _latest_events(session: SessionDep, job: Job) -> tuple[list[JobEvent], int]:
    rows = list(session.scalars(
        select(JobEvent).where(JobEvent.job_id == job.id)
        .order_by(JobEvent.id.desc()).limit(EVENTS_SHOWN)
    ))
    _, count = service.list_events(session, job, after=None, limit=1)
    return rows[::-1], count


def _form_choices(session: SessionDep, user: CurrentUser, registry: RegistryDep) -> dict[str, Any]:
    corpora, _ = list_corpora(session, user.tenant, Page(0, 100))
    eval_sets, _ = list_eval_sets(session, user.tenant, Page(0, 100))
    return {
        "corpora": corpora,
        "eval_sets": eval_sets,
        "students": [s.name for s in registry.list("student")],
        "default_student": JobCreate.model_fields["base_model"].default,
        "teachers": [s.name for s in registry.list("teacher")],
        "generators": [s.name for s in registry.list("generator")],
        "presets": list(PRESETS),
        "query_types": [t.value for t in QueryType],
        # A fresh Idempotency-Key per rendered form: a double submit starts one job.
        "form_id": secrets.token_urlsafe(16),
    }


def _jobs_page(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    registry: RegistryDep,
    offset: int = 0,
    form: dict[str, Any] | None = None,
    error: str = "",
    status_code: int = 200,
) -> Response:
    jobs, count = service.list_jobs(session, user.tenant, Page(offset, LIST_LIMIT))
    return page(
        request, "jobs.html", user, status_code, jobs=jobs, count=count, offset=offset,
        limit=LIST_LIMIT, live=any(_active(j) for j in jobs), form=form or {}, error=error,
        nav="jobs", **_form_choices(session, user, registry),
    )


@router.get("")
def jobs_page(
    request: Request, session: SessionDep, user: CurrentUser, registry: RegistryDep,
    offset: int = 0, corpus: str = "",
) -> Response:
    return _jobs_page(request, session, user, registry, max(0, offset), {"corpus_id": corpus})


@router.get("/live")
def jobs_live(
    request: Request, session: SessionDep, user: CurrentUser, offset: int = 0
) -> Response:
    jobs, _ = service.list_jobs(session, user.tenant, Page(max(0, offset), LIST_LIMIT))
    response = page(request, "jobs_rows.html", user, jobs=jobs)
    response.headers[LIVE_HEADER] = "1" if any(_active(j) for j in jobs) else "0"
    return response


def _job_request(form: dict[str, Any]) -> JobCreate:
    """The form as the API's JobCreate (the same validation as POST /v1/jobs)."""
    body: dict[str, Any] = {"corpus_id": form["corpus_id"], "base_model": form["base_model"],
                            "preset": form["preset"]}
    for field in ("teacher", "generator", "eval_set_id"):
        if form.get(field):
            body[field] = form[field]
    if form.get("query_types"):
        body["query_types"] = form["query_types"]
    if form.get("passages"):
        # A form sends text; the API takes a JSON integer only (a strict int).
        passages = str(form["passages"]).strip()
        if not passages.isascii() or not passages.isdigit():
            raise ValueError(f"passages: a whole number, not {passages!r}")
        body["passages"] = int(passages)
    text = (form.get("hyperparameters") or "").strip()
    if text:
        try:
            body["hyperparameters"] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"hyperparameters: not valid JSON ({exc.msg} at line {exc.lineno}, "
                             f"column {exc.colno})") from None
        if not isinstance(body["hyperparameters"], dict):
            raise ValueError("hyperparameters: a JSON object of recipe sections, e.g. "
                             '{"training": {"max_epochs": 4}}')
    examples = [line.strip() for line in (form.get("example_queries") or "").splitlines()
                if line.strip()]
    if examples:
        overrides = body.setdefault("hyperparameters", {})
        generation = overrides.setdefault("generation", {})
        if not isinstance(generation, dict):
            raise ValueError("hyperparameters: generation must be a JSON object of settings")
        if "example_queries" in generation:
            raise ValueError("example queries: given both in the box and in the recipe "
                             "overrides' generation.example_queries; keep one")
        generation["example_queries"] = examples
    return JobCreate.model_validate(body)


@router.post("")
def start_job(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    registry: RegistryDep,
    settings: SettingsDep,
    corpus_id: Annotated[str, Form(max_length=64)] = "",
    base_model: Annotated[str, Form(max_length=200)] = "",
    preset: Annotated[str, Form(max_length=64)] = "default",
    teacher: Annotated[str, Form(max_length=200)] = "",
    generator: Annotated[str, Form(max_length=200)] = "",
    eval_set_id: Annotated[str, Form(max_length=64)] = "",
    query_types: Annotated[list[str] | None, Form()] = None,
    passages: Annotated[str, Form(max_length=12)] = "",
    hyperparameters: Annotated[str, Form(max_length=100_000)] = "",
    example_queries: Annotated[str, Form(max_length=100_000)] = "",
    form_id: Annotated[str, Form(max_length=64)] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(user, csrf_token)
    form = {
        "corpus_id": corpus_id, "base_model": base_model, "preset": preset, "teacher": teacher,
        "generator": generator, "eval_set_id": eval_set_id, "query_types": query_types or [],
        "passages": passages, "hyperparameters": hyperparameters,
        "example_queries": example_queries,
    }
    try:
        job_request = _job_request(form)
        job = create_job(job_request, Response(), session, user.tenant, registry, settings,
                         form_id or None)
    except (ValueError, ValidationError, AppError) as exc:
        session.rollback()
        message, status = explain_error(exc)
        return _jobs_page(request, session, user, registry, 0, form, message, status)
    return redirect(f"{PREFIX}/jobs/{job.id}")


def _job(session: SessionDep, user: CurrentUser, job_id: str) -> Job:
    try:
        return service.get_job(session, user.tenant, job_id)
    except NotFound as exc:
        raise not_found(exc) from None


def _elapsed(job: Job) -> str:
    """How long the job has run (or ran): "42 s", "7 min", "2 h 05 min"."""
    if job.started_at is None:
        return ""
    seconds = int(((job.finished_at or utcnow()) - job.started_at).total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _job_context(session: SessionDep, job: Job) -> dict[str, Any]:
    events, event_count = _latest_events(session, job)
    return {
        "elapsed": _elapsed(job),
        "job": job,
        "stages": _stages(job),
        "events": events,
        "event_count": event_count,
        "latest": events[-1].message if events else "",
        "active": _active(job),
    }


@router.get("/{job_id}")
def job_page(job_id: str, request: Request, session: SessionDep, user: CurrentUser) -> Response:
    job = _job(session, user, job_id)
    return page(request, "job.html", user, nav="jobs", **_job_context(session, job))


@router.get("/{job_id}/live")
def job_live(job_id: str, request: Request, session: SessionDep, user: CurrentUser) -> Response:
    job = _job(session, user, job_id)
    context = _job_context(session, job)
    response = page(request, "job_live.html", user, **context)
    response.headers[LIVE_HEADER] = "1" if context["active"] else "0"
    return response


@router.post("/{job_id}/cancel")
def cancel(
    job_id: str, request: Request, session: SessionDep, user: CurrentUser,
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(user, csrf_token)
    job = _job(session, user, job_id)
    try:
        cancel_job(job.id, session, user.tenant)
    except AppError as exc:
        session.rollback()
        message, status = explain_error(exc)
        return page(request, "job.html", user, status, nav="jobs", error=message,
                    **_job_context(session, _job(session, user, job_id)))
    return redirect(f"{PREFIX}/jobs/{job_id}")


@router.get("/{job_id}/report")
def report_page(
    job_id: str, request: Request, session: SessionDep, user: CurrentUser, store: StoreDep
) -> Response:
    job = _job(session, user, job_id)
    try:
        inputs = service.report_page_inputs(store, job)
    except AppError as exc:
        message, status = explain_error(exc)
        return page(request, "job.html", user, status, nav="jobs", error=message,
                    **_job_context(session, job))
    return page(request, "report.html", user, nav="jobs", job=job,
                body=report_fragment(**inputs))
