"""What is left of a job once it stops: its objects in the store and its work folders.

- A deleted job's objects (stage outputs and report, or a bulk embedding's shards) are removed
  as soon as it has stopped; a cancelled or failed job's after `intermediate_retention_s`
  (kept that long so someone can look at what went wrong). A succeeded job's stay: its report
  page reads them. `purged_at` marks the removal, so it happens once.
- A worker's work folder of a job (`work_dir/<job id>`) goes when the job has succeeded (its
  outputs are in the store), is deleted, or was cancelled or failed past the retention.
- An unpacked tenant model in a host's cache (`embed_cache_dir/<mdl_ id>`) goes once the model
  is deleted.

Workers run `sweep` every `retention_sweep_s` (as they sweep lapsed leases); the delete routes
remove what they can at once. Imports only the database layer and the object store, like
app.jobs.lifecycle.
"""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta
from pathlib import Path

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import (
    EMBEDDING_JOB_PREFIX,
    FINISHED_JOB_STATUSES,
    AnyJob,
    EmbeddingJob,
    Job,
    JobStatus,
    TunedModel,
    UploadedModel,
    job_tables,
)
from app.db.session import session_scope
from app.settings import Settings
from app.storage import ObjectStore

log = logging.getLogger(__name__)

JOB_PREFIXES = ("job_", EMBEDDING_JOB_PREFIX)


def job_prefix(job_id: str) -> str:
    """The object-store folder of everything a job wrote (stages, partial state, shards)."""
    if job_id.startswith(EMBEDDING_JOB_PREFIX):
        return f"embedding-jobs/{job_id}/"
    return f"jobs/{job_id}/"


def purge_job_objects(store: ObjectStore, session: Session, job: AnyJob) -> int:
    """Remove a stopped job's objects and mark it purged; returns how many objects went. The
    caller commits."""
    removed = store.delete_prefix(job_prefix(job.id))
    model = type(job)
    session.execute(update(model).where(model.id == job.id).values(purged_at=utcnow()))
    log.info("removed %d objects of job %s", removed, job.id,
             extra={"job_id": job.id, "objects": removed})
    return removed


def purge_due(session: Session, retention_s: float) -> list[AnyJob]:
    """Stopped jobs whose objects are due to go: deleted ones at once, cancelled or failed ones
    past the retention; none twice."""
    cutoff = utcnow() - timedelta(seconds=retention_s)
    due: list[AnyJob] = []
    for model in (Job, EmbeddingJob):
        due += session.scalars(
            select(model).where(
                model.purged_at.is_(None),
                model.status.in_(FINISHED_JOB_STATUSES),
                or_(
                    model.deleted_at.is_not(None),
                    and_(model.status.in_([JobStatus.CANCELLED, JobStatus.FAILED]),
                         model.finished_at < cutoff),
                ),
            )
        )
    return due


def folder_due(job: AnyJob | None, retention_s: float) -> bool:
    """Whether a work folder of `job` may go (a job this database does not know is left
    alone: the folder may be another deployment's)."""
    if job is None or job.status not in FINISHED_JOB_STATUSES:
        return False
    if job.deleted_at is not None or job.status == JobStatus.SUCCEEDED:
        return True
    finished = job.finished_at or job.updated_at
    return finished < utcnow() - timedelta(seconds=retention_s)


def sweep_objects(store: ObjectStore, retention_s: float) -> list[str]:
    """Remove the objects of every job due (see purge_due); returns their ids."""
    done = []
    with session_scope() as session:
        due = [(job.id, type(job)) for job in purge_due(session, retention_s)]
    for job_id, _ in due:
        with session_scope() as session:
            model, _ = job_tables(job_id)
            job = session.get(model, job_id)
            if job is None or job.purged_at is not None:
                continue  # another worker's sweep got there first
            purge_job_objects(store, session, job)
        done.append(job_id)
    return done


def sweep_work_folders(work_dir: Path, retention_s: float) -> list[str]:
    """Remove this host's work folders of jobs that no longer need them; returns their ids."""
    if not work_dir.is_dir():
        return []
    removed = []
    for folder in sorted(work_dir.iterdir()):
        if not folder.is_dir() or not folder.name.startswith(JOB_PREFIXES):
            continue
        model, _ = job_tables(folder.name)
        with session_scope() as session:
            due = folder_due(session.get(model, folder.name), retention_s)
        if due:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def sweep_model_cache(cache_dir: Path) -> list[str]:
    """Remove this host's unpacked copies of tenant models that were deleted."""
    if not cache_dir.is_dir():
        return []
    removed = []
    for folder in sorted(cache_dir.iterdir()):
        if not folder.is_dir() or not folder.name.startswith("mdl_"):
            continue
        with session_scope() as session:
            exists = any(session.get(table, folder.name) is not None
                         for table in (TunedModel, UploadedModel))
        if not exists:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def sweep(settings: Settings, store: ObjectStore) -> dict[str, list[str]]:
    """One pass of every sweep above (a worker's background thread runs it periodically)."""
    retention = settings.intermediate_retention_s
    swept = {
        "objects": sweep_objects(store, retention),
        "work_folders": sweep_work_folders(Path(settings.work_dir), retention),
        "cached_models": sweep_model_cache(Path(settings.embed_cache_dir)),
    }
    if any(swept.values()):
        log.info("retention sweep removed %s", {k: len(v) for k, v in swept.items()},
                 extra={"removed": {k: len(v) for k, v in swept.items()}})
    return swept
