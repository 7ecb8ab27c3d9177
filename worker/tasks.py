"""The tasks: one Celery task runs one ml_core stage of one job (docs/architecture.md); another
embeds a stored corpus for a bulk embedding job.

A task receives the job (and stage) id, claims it, runs it (worker.stage_run,
worker.embedding_run) under a lease (worker.leases), and turns what happened into the job's
record: errors become the job's error code, infrastructure hiccups are retried. Cancellation
is cooperative (the progress callback raises JobCancelled when the row says `cancelling`) and
forced (revoke with terminate: SIGTERM to the pool process, see `_on_terminated`).
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import ValidationError
from sqlalchemy import select

from app.db.models import job_tables
from app.db.session import session_scope
from app.jobs import lifecycle
from app.jobs.lifecycle import JobCancelled, StageBusy
from app.logs import bind, log_scope
from app.settings import Settings, get_settings
from ml_core.errors import MLCoreError
from ml_core.pipeline import STAGES
from worker.celery_app import EMBED_STAGE, TASK_EMBED_CORPUS, TASK_RUN_STAGE, celery_app
from worker.embedding_run import EmbeddingRun, claim_embedding
from worker.leases import LeaseKeeper, LeaseLost, lease_owner, lease_wait_s
from worker.stage_run import StageRun, claim

log = logging.getLogger(__name__)

TRANSIENT_RETRIES = 3
# A stage's outcome (failed, cancelled) that could not be written to the database is retried
# this often, without limit: the job row must not stay `running` with no task behind it.
RECORD_RETRY_S = 30


class Claimed(Protocol):
    """A claimed delivery, ready to run under the job's lease."""

    def run(self) -> str: ...


# Claim this delivery as lease owner `owner`: what to run, or None when there is nothing to do.
Claim = Callable[[Settings, str, bool], "Claimed | None"]

TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "ignore_result": True,
    # Retries are counted by hand: TRANSIENT_RETRIES for the stage's own errors (in the
    # transient_retries argument), none for waiting on a busy stage or for recording an
    # outcome (see _retry_recording).
    "max_retries": None,
}


@celery_app.task(name=TASK_RUN_STAGE, **TASK_OPTIONS)
def run_stage(self: Any, job_id: str, stage: str, transient_retries: int = 0) -> str:
    """Run one stage of one job (see the module docstring); returns what happened."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")

    def claim_stage(settings: Settings, owner: str, redelivered: bool) -> StageRun | None:
        inputs = claim(job_id, stage, redelivered, owner, settings.lease_ttl_s,
                       settings.max_stage_losses)
        return None if inputs is None else StageRun(inputs, stage, settings, owner)

    return _run(self, job_id, stage, transient_retries, claim_stage)


@celery_app.task(name=TASK_EMBED_CORPUS, **TASK_OPTIONS)
def embed_corpus(self: Any, job_id: str, transient_retries: int = 0) -> str:
    """Embed a stored corpus for a bulk embedding job (worker.embedding_run), resuming after
    its last finished shard; returns what happened."""

    def claim_job(settings: Settings, owner: str, redelivered: bool) -> EmbeddingRun | None:
        inputs = claim_embedding(job_id, redelivered, owner, settings.lease_ttl_s,
                                 settings.max_stage_losses)
        return None if inputs is None else EmbeddingRun(inputs, settings, owner)

    return _run(self, job_id, EMBED_STAGE, transient_retries, claim_job)


def _run(task: Any, job_id: str, stage: str, transient_retries: int, claim_delivery: Claim) -> str:
    """Every log line of the delivery carries the job, stage, task, tenant and the id of the
    request that created the job (app.logs)."""
    task_id = getattr(task.request, "id", None)
    with log_scope(job_id=job_id, stage=stage, task_id=task_id):
        _bind_job_fields(job_id)
        return _run_logged(task, job_id, stage, transient_retries, claim_delivery)


def _bind_job_fields(job_id: str) -> None:
    """Add the job's tenant and creating request id to the log scope (ids only, never text)."""
    model, _ = job_tables(job_id)
    try:
        with session_scope() as session:
            row = session.execute(
                select(model.tenant_id, model.request_id).where(model.id == job_id)
            ).one_or_none()
    except Exception as error:  # the claim below meets the same error and handles it
        log.warning("could not read the job's log fields: %s", error)
        return
    if row is not None:
        bind(tenant_id=row.tenant_id, request_id=row.request_id)


def _run_logged(
    task: Any, job_id: str, stage: str, transient_retries: int, claim_delivery: Claim
) -> str:
    """Claim the delivery, run it under the job's lease, and record what happened."""
    delivery = getattr(task.request, "delivery_info", None) or {}
    redelivered = bool(delivery.get("redelivered"))
    settings, owner = get_settings(), lease_owner()
    try:
        claimed = claim_delivery(settings, owner, redelivered)
        if claimed is None:
            return "dropped"
        log.info("job %s: %s running", job_id, stage, extra={"redelivered": redelivered})
        with LeaseKeeper(job_id, owner, settings.lease_ttl_s):
            outcome = claimed.run()
        log.info("job %s: %s %s", job_id, stage, outcome, extra={"outcome": outcome})
        return outcome
    except StageBusy as busy:
        wait = lease_wait_s(settings)
        log.info("%s; trying again in %.0fs", busy, wait)
        raise task.retry(countdown=wait) from busy
    except LeaseLost as lost:
        log.warning("%s; this copy stops", lost)
        return "superseded"
    except JobCancelled:
        try:
            _record_cancel(job_id, stage)
        except Exception as error:
            raise _retry_recording(task, job_id, stage, "cancel", error) from error
        return "cancelled"
    except SystemExit:
        # billiard turns the SIGTERM of revoke(terminate=True) (and of a cold shutdown) into
        # SystemExit in the pool process. Record a cancel; a shutdown leaves the job alone.
        _on_terminated(job_id, stage)
        raise
    except Exception as error:
        if _is_transient(error) and transient_retries < TRANSIENT_RETRIES:
            log.warning("job %s %s: transient error, retrying: %s", job_id, stage, error)
            raise task.retry(
                kwargs={"transient_retries": transient_retries + 1},
                exc=error,
                countdown=10 * (transient_retries + 1),
            ) from error
        try:
            _record_failure(job_id, stage, error)
        except Exception as recording:
            raise _retry_recording(task, job_id, stage, "failure", recording) from error
        return "failed"


def _retry_recording(task: Any, job_id: str, stage: str, what: str, error: Exception) -> Any:
    """The stage's outcome could not be written (the database is down): send the task again.

    Acknowledging it instead would leave the row `running` (or `cancelling`) with no task to
    ever finish it. The retried delivery goes through the claim once the database is back: a
    cancel is then recorded without running anything, a failure by running the stage again.
    Retries until it can write (no limit: the record must not be lost), every RECORD_RETRY_S.
    """
    log.error(
        "job %s %s: could not record its %s (%s); retrying in %ss",
        job_id,
        stage,
        what,
        error,
        RECORD_RETRY_S,
    )
    return task.retry(exc=error, countdown=RECORD_RETRY_S)


def _on_terminated(job_id: str, stage: str) -> None:
    """The pool process is being terminated mid-stage: finish a requested cancel.

    A terminate that is not a cancel (cold shutdown) only says so on the timeline, so the
    stage's next delivery does not count it as a lost process: the message is not acknowledged,
    and the broker (or the lease sweep) delivers the stage again.
    """
    try:
        with session_scope() as session:
            message = f"cancelled during {stage} (task terminated)"
            if not lifecycle.cancel(session, job_id, stage, message, requested_only=True):
                lifecycle.interrupted(session, job_id, stage)
    except Exception:  # we are exiting; never mask the SystemExit
        log.exception("could not record termination of job %s", job_id)


def _is_transient(error: Exception) -> bool:
    """Infrastructure hiccups worth a retry (broker, database or object store connection)."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import EndpointConnectionError
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import OperationalError

    # None of the library ones derive from the builtin ConnectionError: Celery re-raises a
    # publish that fails after its retries (the next stage's send_stage) as kombu's
    # OperationalError, and redis has its own hierarchy.
    return isinstance(
        error,
        (
            ConnectionError,
            BotoConnectionError,
            EndpointConnectionError,
            BrokerError,
            RedisConnectionError,
            RedisTimeoutError,
            OperationalError,
            TimeoutError,
        ),
    )


def error_code(error: Exception) -> str | None:
    """The job error code of a deliberate error (bad inputs or settings), else None."""
    if isinstance(error, MLCoreError):
        return error.code
    if isinstance(error, ValidationError):  # the stored recipe no longer validates
        return "invalid_recipe"
    return None


def out_of_memory(error: BaseException) -> bool:
    """Whether an allocation failed: Python's MemoryError, torch's CUDA out-of-memory error, or
    its CPU allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")  # not imported: the error cannot be torch's
    cuda_oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if cuda_oom is not None and isinstance(error, cuda_oom):
        return True
    refusals = ("can't allocate memory", "not enough memory: you tried to allocate")
    return isinstance(error, RuntimeError) and any(text in str(error) for text in refusals)


def _record_cancel(job_id: str, stage: str) -> None:
    with session_scope() as session:
        lifecycle.cancel(session, job_id, stage, f"cancelled during {stage}")


def _record_failure(job_id: str, stage: str, error: Exception) -> None:
    """Mark the job failed: deliberate errors with their message, anything else as internal."""
    code = error_code(error)
    if code is not None:
        detail, data = str(error), {"exception": type(error).__name__}
        log.warning("job %s failed in %s: %s", job_id, stage, error)
    elif out_of_memory(error):
        code = "out_of_memory"
        detail = f"the {stage} stage ran out of memory. {lifecycle.memory_advice(stage)}"
        data = {"exception": type(error).__name__, "message": str(error)[:2000]}
        log.error("job %s ran out of memory in %s: %s", job_id, stage, error)
    else:
        # The traceback goes into the event (operators), never into the API's error detail.
        code, detail = "internal_error", f"the {stage} stage failed unexpectedly"
        data = {
            "exception": type(error).__name__,
            "message": str(error)[:2000],
            "traceback": traceback.format_exc()[-8000:],
        }
        log.exception("job %s failed in %s", job_id, stage)
    with session_scope() as session:
        lifecycle.fail(session, job_id, stage, code, detail, data)
