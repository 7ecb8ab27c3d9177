"""What depends on a stored resource, asked before it is deleted: the tenant's jobs (training
and bulk embedding) not yet finished that use it. Imports only the database layer, so every
resource's service can ask."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import ACTIVE_JOB_STATUSES, AnyJob, EmbeddingJob, Job
from app.errors import ResourceInUse


def active_jobs_using(
    session: Session, tenant_id: str, *, corpus_id: str | None = None,
    eval_set_id: str | None = None, query_set_id: str | None = None,
    model_id: str | None = None,
) -> list[AnyJob]:
    """The tenant's jobs (training and bulk embedding) not yet finished that use the corpus,
    eval set, query set or model given: what would break if it were deleted."""
    found: list[AnyJob] = []
    for table in (Job, EmbeddingJob):
        where = [table.tenant_id == tenant_id, table.status.in_(ACTIVE_JOB_STATUSES)]
        if corpus_id is not None:
            where.append(table.corpus_id == corpus_id)
        if eval_set_id is not None:
            if table is not Job:
                continue
            where.append(Job.eval_set_id == eval_set_id)
        if query_set_id is not None:
            if table is not Job:
                continue
            where.append(Job.query_set_id == query_set_id)
        rows = list(session.scalars(select(table).where(*where).order_by(table.created_at)))
        if model_id is not None:
            rows = [row for row in rows if model_id in _models_of(row)]
        found += rows
    return found


def _models_of(job: AnyJob) -> set[str]:
    if isinstance(job, EmbeddingJob):
        return {job.model}
    return {str(job.recipe.get(role)) for role in ("student", "teacher", "generator")}


def refuse_if_used(resource: str, resource_id: str, users: Sequence[AnyJob],
                   hint: str = "cancel them first") -> None:
    """409 in_use naming the jobs (`job_ids`) when there are any."""
    if users:
        ids = [job.id for job in users]
        raise ResourceInUse(
            f"{resource.replace('_', ' ')} {resource_id} is used by {len(ids)} job(s) that "
            f"have not finished: {', '.join(ids[:10])}; {hint}",
            resource=resource, id=resource_id, job_id=ids[0], job_ids=ids,
        )
