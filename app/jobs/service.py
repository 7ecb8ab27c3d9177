"""Job rules: create (idempotently), read, list, rename, delete, events, cancel, report. Status
and events are written by app.jobs.lifecycle, shared with the worker."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.corpora.service import get_corpus
from app.db.base import utcnow
from app.db.models import (
    ACTIVE_JOB_STATUSES,
    AnyJob,
    AnyJobEvent,
    EventKind,
    Job,
    JobStatus,
    Tenant,
    job_tables,
)
from app.db.tenant_rows import newest_first, owned
from app.deps import Page
from app.errors import IdempotencyConflict, InvalidRequest, InvalidState, NotFound
from app.eval_sets.service import get_eval_set
from app.ids import new_id
from app.jobs import lifecycle
from app.jobs.recipe import check_models, resolve_recipe, with_deployment_generation
from app.jobs.schemas import JobCreate, JobUpdate
from app.logs import current_fields
from app.metadata import matches
from app.models.tenant_models import find_tenant_model, is_tenant_model
from app.query_sets.service import get_query_set
from app.quotas import check_concurrent_jobs
from app.reports import STAGE_FILES
from app.storage import ObjectNotFound, ObjectStore
from ml_core.registry import ModelRegistry

log = logging.getLogger(__name__)


def request_hash(request: JobCreate) -> str:
    """sha256 of the request's canonical JSON (what an Idempotency-Key retry must repeat)."""
    blob = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _by_idempotency_key(session: Session, tenant: Tenant, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == key))


def _replay(job: Job, digest: str) -> Job:
    if job.request_hash != digest:
        raise IdempotencyConflict(
            "this Idempotency-Key was used with a different request body", job_id=job.id
        )
    return job


def create_job(
    session: Session,
    tenant: Tenant,
    request: JobCreate,
    registry: ModelRegistry,
    idempotency_key: str | None,
    max_concurrent_jobs: int,
    generation: tuple[str | None, str | None, str | None] | None = None,
) -> tuple[Job, bool]:
    """A new queued job, or the job an earlier request with the same Idempotency-Key created:
    returns (job, created). The caller commits, then enqueues. `generation`: the deployment's
    (backend, endpoint, model) for query generation (Settings.generation_backend)."""
    digest = request_hash(request)
    if idempotency_key is not None:
        existing = _by_idempotency_key(session, tenant, idempotency_key)
        if existing is not None:
            return _replay(existing, digest), False
    check_concurrent_jobs(session, tenant, max_concurrent_jobs)
    # Locked until commit so the corpus cannot be deleted under a job being created.
    corpus = get_corpus(session, tenant, request.corpus_id, lock=True)
    if request.eval_set_id is not None:
        eval_set = get_eval_set(session, tenant, request.eval_set_id)
        if eval_set.corpus_id != corpus.id:
            raise InvalidRequest(
                f"eval set {eval_set.id} judges corpus {eval_set.corpus_id}, not {corpus.id}",
                field="eval_set_id",
            )
    if request.query_set_id is not None:
        query_set = get_query_set(session, tenant, request.query_set_id)
        if query_set.corpus_id != corpus.id:
            raise InvalidRequest(
                f"query set {query_set.id} holds queries for corpus {query_set.corpus_id}, "
                f"not {corpus.id}",
                field="query_set_id",
            )
    recipe = resolve_recipe(request)
    if generation is not None:
        recipe = with_deployment_generation(recipe, request, *generation)
    own = (find_tenant_model(session, tenant.id, recipe.student)
           if is_tenant_model(recipe.student) else None)
    check_models(recipe, registry, [own.id] if own is not None else [])
    if not recipe.generation.synthetic:
        # Without synthetic queries a job has only the customer's to train on, and none held
        # out to judge by.
        for field, given in (("query_set_id", request.query_set_id),
                             ("eval_set_id", request.eval_set_id)):
            if given is None:
                raise InvalidRequest(
                    f"hyperparameters.generation.synthetic is off: the job needs {field}",
                    field=field,
                )
    job = Job(
        id=new_id("job"),
        tenant_id=tenant.id,
        corpus_id=corpus.id,
        eval_set_id=request.eval_set_id,
        query_set_id=request.query_set_id,
        idempotency_key=idempotency_key,
        request_hash=digest,
        spec=request.model_dump(mode="json"),
        recipe=recipe.model_dump(mode="json"),
        name=request.name,
        metadata_=dict(request.metadata),
        request_id=current_fields().get("request_id"),
    )
    session.add(job)
    lifecycle.mark_queued(session, job)
    try:
        session.flush()
    except IntegrityError:
        if idempotency_key is None:
            raise
        # A concurrent request with the same key won the insert: answer with its job.
        session.rollback()
        existing = _by_idempotency_key(session, tenant, idempotency_key)
        if existing is None:
            raise
        return _replay(existing, digest), False
    return job, True


def get_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    """The tenant's job `job_id` (404 otherwise, and once deleted)."""
    return owned(session, Job, tenant.id, job_id, "job", Job.deleted_at.is_(None))


def list_jobs(
    session: Session, tenant: Tenant, page: Page, name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Job], int]:
    """A page of the tenant's jobs (with this name, holding these metadata pairs), newest
    first, and their total."""
    where = [Job.tenant_id == tenant.id, Job.deleted_at.is_(None)]
    if name is not None:
        where.append(Job.name == name)
    where += matches(Job.metadata_, metadata or {})
    return newest_first(session, Job, page, *where)


def update_job(job: AnyJob, update: JobUpdate) -> AnyJob:
    """Rename a job of either kind or replace its metadata (only the fields the request
    sets)."""
    if "name" in update.model_fields_set:
        job.name = update.name
    if "metadata" in update.model_fields_set:
        job.metadata_ = dict(update.metadata or {})
    return job


def delete_job(session: Session, job: AnyJob) -> str | None:
    """Delete a job of either kind: one still queued or running is cancelled first (a running
    one stops at its next progress check). Its objects go once it has stopped
    (app.jobs.retention), its events with it; a tuned model it produced stays (delete that on
    its own). Returns the task id to revoke after commit."""
    task_id = None
    if job.status in ACTIVE_JOB_STATUSES:
        lifecycle.request_cancel(session, job)
        if job.status == JobStatus.CANCELLED:
            task_id = job.celery_task_id
    job.deleted_at = utcnow()
    if isinstance(job, Job):
        job.idempotency_key = None  # a retry with that key creates a new job
    lifecycle.add_event(session, job.id, EventKind.STATUS, "deleted",
                        data={"status": job.status.value, "deleted": True})
    session.flush()
    return task_id


def list_events(
    session: Session, job: AnyJob, after: int | None, limit: int
) -> tuple[list[AnyJobEvent], int]:
    """Up to `limit` events of the job (of either kind) with id > `after`, oldest first, and
    the job's total."""
    _, event = job_tables(job.id)
    count = session.scalar(
        select(func.count()).select_from(event).where(event.job_id == job.id)
    ) or 0
    query = select(event).where(event.job_id == job.id)
    if after is not None:
        query = query.where(event.id > after)
    rows = session.scalars(query.order_by(event.id).limit(limit))
    return list(rows), count


def cancel_job(session: Session, job: AnyJob) -> tuple[AnyJob, str | None]:
    """Cancel a job: queued -> cancelled now, running -> cancelling (the worker stops it).
    Returns (job, task id to revoke after commit)."""
    if not lifecycle.request_cancel(session, job):
        raise InvalidState(
            f"job {job.id} has already finished ({job.status.value})", status=job.status.value
        )
    return job, job.celery_task_id if job.status == JobStatus.CANCELLED else None


def stage_key(job: Job, stage: str, name: str) -> str:
    """Where the worker leaves file `name` of a finished stage of the job."""
    return f"jobs/{job.id}/{stage}/{name}"


def report_key(job: Job) -> str:
    """Where the evaluate stage leaves the job's report."""
    return stage_key(job, "evaluate", "report.json")


def load_report(store: ObjectStore, job: Job) -> dict[str, Any]:
    """The job's evaluation report; 409 until the job has succeeded."""
    if job.status != JobStatus.SUCCEEDED:
        raise InvalidState(
            f"job {job.id} is {job.status.value}; its report exists once it has succeeded",
            status=job.status.value,
        )
    try:
        return json.loads(store.get_bytes(report_key(job)))
    except ObjectNotFound:
        raise NotFound(f"job {job.id} has no report", resource="report", id=job.id) from None


def _stage_json(store: ObjectStore, job: Job, stage: str, name: str) -> dict[str, Any] | None:
    try:
        return json.loads(store.get_bytes(stage_key(job, stage, name)))
    except (ObjectNotFound, ValueError):
        # The page is drawn without that section rather than not at all.
        log.warning("job %s: no readable %s/%s for the report page", job.id, stage, name)
        return None


def report_page_inputs(store: ObjectStore, job: Job) -> dict[str, Any]:
    """Keyword arguments of app.reports.render_report_html for the job: the report (409 until
    the job has succeeded), the distill stage's history and the filter stage's summary (None
    when missing), and the header's facts."""
    report = load_report(store, job)
    facts = [("job", job.id)]
    if job.model_id:
        facts.append(("model", job.model_id))
    facts.append(("corpus", job.corpus_id))
    if job.eval_set_id:
        facts.append(("judgements", job.eval_set_id))
    if job.finished_at:
        facts.append(("finished", job.finished_at.strftime("%Y-%m-%d %H:%M UTC")))
    extras = {
        name: _stage_json(store, job, stage, file_name)
        for name, (stage, file_name) in STAGE_FILES.items() if name != "report"
    }
    return {"report": report, **extras, "facts": facts}
