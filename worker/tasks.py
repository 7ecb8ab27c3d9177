"""The stage task: one Celery task runs one ml_core stage of one job (docs/contracts.md,
"Worker flow").

    load job row -> sync earlier stages from the object store -> run the stage (or skip it when
    its manifest is already stored) -> upload its folder, manifest last -> record metrics and
    events -> send the next stage's task; after evaluate, archive the model and finish the job.

Everything a task needs is in the database row and the object store, so any worker on any host
can run any stage, and a redelivered task (worker crash, lost host) repeats only unfinished
work. Cancellation is cooperative (the progress callback raises JobCancelled when the row says
`cancelling`) and forced (revoke with terminate: SIGTERM to the pool process, see
`_on_terminated`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tarfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import signals
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import (
    FINISHED_JOB_STATUSES,
    Corpus,
    EvalSet,
    EventKind,
    Job,
    JobEvent,
    JobStatus,
    QuerySet,
    Recommendation,
    TunedModel,
)
from app.db.session import get_engine, session_scope
from app.ids import new_id
from app.settings import Settings, get_settings
from app.storage import ObjectNotFound, ObjectStore, copy_store_to_tree, object_store_from_url
from ml_core.config import RecipeConfig
from ml_core.pipeline import MANIFEST, STAGES, StageContext, StageError, stage_fingerprint
from ml_core.pipeline import run_stage as run_pipeline_stage
from ml_core.records import ProgressFn
from ml_core.registry import ModelRegistry
from worker.celery_app import TASK_RUN_STAGE, celery_app
from worker.dispatch import send_stage

log = logging.getLogger(__name__)

# Share of the whole job each stage represents, for one overall progress figure. Rough
# wall-clock shares of a CPU run; generation and training dominate.
STAGE_WEIGHTS: dict[str, float] = {
    "prepare": 0.05,
    "generate": 0.30,
    "filter": 0.25,
    "distill": 0.30,
    "evaluate": 0.10,
}
# Progress events (the job's timeline) are sparser than progress updates.
PROGRESS_EVENT_INTERVAL_S = 10.0
# Files a stage writes for its own resume or bookkeeping that other hosts never need:
# distill's training state and best-checkpoint copy (model/ holds the same weights).
LOCAL_ONLY: dict[str, tuple[str, ...]] = {"distill": ("state", "best", "best.tmp", "best.old")}
TRANSIENT_RETRIES = 3
# A stage's outcome (failed, cancelled) that could not be written to the database is retried
# this often, without limit: the job row must not stay `running` with no task behind it.
RECORD_RETRY_S = 30


class JobCancelled(Exception):
    """Raised from the progress callback when the job row says `cancelling`."""


class StageBusy(Exception):
    """This stage of the job is running in another live worker process (it holds the lease)."""


class LeaseLost(Exception):
    """Raised from the progress callback when another delivery has taken over the stage (this
    process's heartbeat lapsed, so it was taken for dead): stop without touching the row."""


@dataclass(frozen=True)
class JobInputs:
    """What a stage reads from the job's rows, copied out of the session."""

    job_id: str
    tenant_id: str
    recipe: dict[str, Any]
    spec: dict[str, Any]
    corpus_key: str
    eval_queries_key: str | None
    eval_qrels_key: str | None
    train_queries_key: str | None = None


def stage_offset(stage: str) -> float:
    """Overall progress when `stage` starts."""
    return sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(stage)])


# ---------------------------------------------------------------------------------------------
# Database helpers (short transactions: never hold a transaction across a stage)


def add_event(
    session: Session,
    job_id: str,
    kind: EventKind,
    message: str,
    stage: str | None = None,
    progress: float | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Append one event to a job's timeline."""
    session.add(
        JobEvent(
            job_id=job_id,
            kind=kind,
            stage=stage,
            progress=progress,
            message=message,
            data=data or {},
        )
    )


def _locked_job(session: Session, job_id: str) -> Job | None:
    """The job row, locked until the session commits: the worker reads it, decides and writes
    it back while the cancel endpoint's compare-and-set waits (FOR UPDATE on PostgreSQL; on
    SQLite the database's write lock, see app.db.session)."""
    return session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()


def mark_cancelled(job_id: str, stage: str | None, message: str) -> bool:
    """cancelling/running/queued -> cancelled, once; True when this call made the change."""
    with session_scope() as session:
        job = _locked_job(session, job_id)
        if job is None or job.status in FINISHED_JOB_STATUSES:
            return False
        job.status = JobStatus.CANCELLED
        job.finished_at = utcnow()
        add_event(
            session, job_id, EventKind.STATUS, message, stage=stage, data={"status": "cancelled"}
        )
        return True


def _mark_failed(job_id: str, stage: str, code: str, detail: str, data: dict[str, Any]) -> None:
    with session_scope() as session:
        job = _locked_job(session, job_id)
        if job is None or job.status in FINISHED_JOB_STATUSES:
            return
        job.status = JobStatus.FAILED
        job.error = {"error": code, "detail": detail, "stage": stage}
        job.finished_at = utcnow()
        add_event(
            session,
            job_id,
            EventKind.STATUS,
            f"{stage} failed: {detail}",
            stage=stage,
            data={"status": "failed", "error": code, **data},
        )


# ---------------------------------------------------------------------------------------------
# The job lease: one live process per running stage


# The owner the lease sweeper writes when it re-sends a stage whose holder stopped renewing:
# "requeued:N", N the re-sends in a row that no task has claimed yet. No process holds it, so
# the re-sent task claims it at once. Other sweepers leave the job alone for lease_ttl_s, then
# twice that, and so on up to MAX_REQUEUE_BACKOFF times: a re-sent task that is only waiting in
# a long queue is not sent again every lease period, and one that was lost is still replaced.
REQUEUED = "requeued"
MAX_REQUEUE_BACKOFF = 16


def requeues(holder: str | None) -> int:
    """How many times in a row the sweep has re-sent the stage without a task claiming it."""
    marker, _, count = (holder or "").partition(":")
    if marker != REQUEUED:
        return 0
    return int(count) if count.isdigit() else 1  # bare "requeued": written before counting


def lease_owner() -> str:
    """This process as a lease holder: "host:pid"."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid: int) -> bool:
    """Whether process `pid` on this host is alive (a zombie, killed but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    try:
        # The state is the field after "(comm)", which may itself hold spaces or parentheses.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def lease_held_by_another(job: Job, owner: str) -> bool:
    """Whether another live process holds the job's lease.

    Live: its heartbeat has not lapsed and, when it is on this host, its process still exists
    (so a worker killed here is replaced at once; on another host, after lease_ttl_s).
    """
    holder, until = job.lease_owner, job.lease_expires_at
    if not holder or holder == owner or requeues(holder) or until is None or until <= utcnow():
        return False
    host, _, pid = holder.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        return _process_alive(int(pid))
    return True


def _raise_if_taken_over(job_id: str, stage: str, owner: str | None, holder: str | None) -> None:
    """LeaseLost when another delivery now holds the lease this process took."""
    if owner and holder not in (None, owner):
        raise LeaseLost(f"job {job_id} {stage} taken over by {holder}")


class LeaseKeeper:
    """A heartbeat thread renewing the job's lease while this process runs its stage."""

    def __init__(self, job_id: str, owner: str, ttl_s: float) -> None:
        self.job_id, self.owner, self.ttl_s = job_id, owner, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def renew(self) -> bool:
        """Push the lease's expiry on; False when this process no longer holds it."""
        with session_scope() as session:
            renewed = session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.lease_owner == self.owner)
                .values(lease_expires_at=utcnow() + timedelta(seconds=self.ttl_s))
            )
            return bool(renewed.rowcount)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 5):
            try:
                if not self.renew():
                    return  # released (stage done) or taken over: the progress check stops us
            except Exception as error:  # a database blip: try again at the next beat
                log.warning("job %s: could not renew its lease: %s", self.job_id, error)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        # However the stage ended here, this process no longer runs it. Ended by a return or
        # an error (advanced, finished, failed, cancelled, to be retried): release it, so the
        # next task (or a retry landing on another process) need not wait for it to lapse.
        # Ended by the process exiting (SystemExit: a shutdown, or the terminate of a cancel):
        # let it lapse now, so the sweep re-sends the stage instead of the job waiting hours
        # for the broker to redeliver an unacknowledged task.
        # Best effort: the database may be what failed.
        exiting = kind is not None and not issubclass(kind, Exception)
        values = {"lease_expires_at": utcnow()} if exiting else {
            "lease_owner": None,
            "lease_expires_at": None,
        }
        try:
            with session_scope() as session:
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.lease_owner == self.owner)
                    .values(**values)
                )
        except Exception as error:
            log.warning("job %s: could not give up its lease: %s", self.job_id, error)


def _claim(
    job_id: str, stage: str, redelivered: bool, owner: str = "", lease_ttl_s: float = 300.0
) -> JobInputs | None:
    """Decide whether this delivery should run; mark the job running and take its lease.

    None: nothing to do. StageBusy: another live process is running this stage (see
    `lease_held_by_another`); the caller tries again later.
    """
    with session_scope() as session:
        job = _locked_job(session, job_id)
        if job is None:
            log.warning("job %s not found; dropping its %s task", job_id, stage)
            return None
        if job.status in FINISHED_JOB_STATUSES:
            log.info("job %s is %s; dropping its %s task", job_id, job.status, stage)
            return None
        if job.status == JobStatus.CANCELLING:
            job.status = JobStatus.CANCELLED
            job.finished_at = utcnow()
            add_event(
                session,
                job_id,
                EventKind.STATUS,
                "cancelled before " + stage,
                stage=stage,
                data={"status": "cancelled"},
            )
            return None
        if job.stage in STAGES and STAGES.index(job.stage) > STAGES.index(stage):
            # A duplicate delivery of a stage the job has moved past (redelivered after the
            # visibility timeout while the first copy finished): the first copy already sent
            # the next stage, so this one must not.
            log.info("job %s is at %s; dropping stale %s task", job_id, job.stage, stage)
            return None
        if job.stage == stage and lease_held_by_another(job, owner):
            # A second copy of the stage that is running (redelivered after the visibility
            # timeout, or sent twice): running it too would share the work folder. Wait: it
            # is dropped as stale once the holder advances, and takes over if the holder dies.
            raise StageBusy(f"job {job_id} {stage} is running in {job.lease_owner}")
        first_start = job.status == JobStatus.QUEUED
        # Deliveries of this stage so far: more than one means a redelivery (crash, lost host).
        attempt = 1 + (
            session.scalar(
                select(func.count())
                .select_from(JobEvent)
                .where(
                    JobEvent.job_id == job_id,
                    JobEvent.kind == EventKind.STAGE,
                    JobEvent.stage == stage,
                    JobEvent.message == f"{stage} started",
                )
            )
            or 0
        )
        job.status = JobStatus.RUNNING
        job.started_at = job.started_at or utcnow()
        job.attempts = (job.attempts or 0) + 1
        job.stage = stage
        job.lease_owner = owner or None
        job.lease_expires_at = utcnow() + timedelta(seconds=lease_ttl_s) if owner else None
        job.progress = max(job.progress or 0.0, stage_offset(stage))
        if first_start:
            add_event(session, job_id, EventKind.STATUS, "running", data={"status": "running"})
        add_event(
            session,
            job_id,
            EventKind.STAGE,
            f"{stage} started",
            stage=stage,
            progress=job.progress,
            data={"attempt": attempt, "redelivered": redelivered},
        )
        corpus = session.get(Corpus, job.corpus_id)
        eval_set = session.get(EvalSet, job.eval_set_id) if job.eval_set_id else None
        query_set = session.get(QuerySet, job.query_set_id) if job.query_set_id else None
        if corpus is None:
            raise StageError(f"corpus {job.corpus_id} of job {job_id} no longer exists")
        return JobInputs(
            job_id=job.id,
            tenant_id=job.tenant_id,
            recipe=dict(job.recipe),
            spec=dict(job.spec or {}),
            corpus_key=corpus.object_key,
            eval_queries_key=eval_set.queries_key if eval_set else None,
            eval_qrels_key=eval_set.qrels_key if eval_set else None,
            train_queries_key=query_set.queries_key if query_set else None,
        )


class ProgressReporter:
    """The ProgressFn handed to a stage: throttled progress writes, events and cancel checks."""

    def __init__(
        self, job_id: str, stage: str, interval_s: float = 1.0, owner: str | None = None
    ) -> None:
        # Progress is written, and the row's status read to notice a cancel, at most every
        # interval_s: about once a second keeps cancel prompt and the database quiet.
        self.job_id, self.stage, self.interval_s = job_id, stage, interval_s
        self.owner = owner  # this process's lease: lost to another delivery -> LeaseLost
        self._last_write = 0.0
        self._last_event = 0.0
        self._last_event_tenth = -1
        self._last_message = ""

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - self._last_write < self.interval_s and fraction < 1.0:
            return
        self._last_write = now
        fraction = min(max(fraction, 0.0), 1.0)
        overall = stage_offset(self.stage) + STAGE_WEIGHTS[self.stage] * fraction
        tenth = int(fraction * 10)
        want_event = message != self._last_message and (
            tenth != self._last_event_tenth or now - self._last_event >= PROGRESS_EVENT_INTERVAL_S
        )
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            if job is None or job.status in (JobStatus.CANCELLING, JobStatus.CANCELLED):
                raise JobCancelled(self.job_id)
            _raise_if_taken_over(self.job_id, self.stage, self.owner, job.lease_owner)
            # A redelivered stage reports again from 0: never move the bar backwards.
            session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.progress < overall)
                .values(progress=overall)
            )
            if want_event:
                add_event(
                    session,
                    self.job_id,
                    EventKind.PROGRESS,
                    message,
                    stage=self.stage,
                    progress=round(overall, 4),
                    data={"stage_fraction": round(fraction, 4)},
                )
        if want_event:
            self._last_event, self._last_event_tenth = now, tenth
            self._last_message = message


# ---------------------------------------------------------------------------------------------
# Object store helpers


def store_for(settings: Settings) -> ObjectStore:
    """The configured object store."""
    return object_store_from_url(settings.object_store_url, settings)


def stage_prefix(job_id: str, stage: str) -> str:
    return f"jobs/{job_id}/{stage}"


def sync_stage_down(store: ObjectStore, job_id: str, stage: str, folder: Path) -> bool:
    """Make `folder` hold the stored copy of a finished stage; True if anything was fetched.

    The local copy is reused when its manifest equals the stored one. Otherwise the folder is
    rebuilt from the store (a marker records which manifest a partial download belongs to, so
    an interrupted download resumes with only the missing files), manifest written last.
    """
    try:
        stored = store.get_bytes(f"{stage_prefix(job_id, stage)}/{MANIFEST}")
    except ObjectNotFound:
        raise StageError(f"stage {stage!r} of job {job_id} has no stored manifest") from None
    local_manifest = folder / MANIFEST
    if local_manifest.is_file() and local_manifest.read_bytes() == stored:
        return False
    marker = folder / ".syncing"
    digest = hashlib.sha256(stored).hexdigest()
    if not (marker.is_file() and marker.read_text() == digest):
        shutil.rmtree(folder, ignore_errors=True)  # another run's output: start clean
        folder.mkdir(parents=True)
        marker.write_text(digest)
    copy_store_to_tree(store, stage_prefix(job_id, stage), folder, skip=(MANIFEST,))
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_bytes(stored)
    tmp.replace(local_manifest)
    marker.unlink()
    return True


def upload_stage(store: ObjectStore, job_id: str, stage: str, folder: Path) -> int:
    """Upload a finished stage folder, manifest.json last (its presence marks it done)."""
    prefix = stage_prefix(job_id, stage)
    # Remove the stored manifest first: a crash mid-upload must not leave an old manifest
    # vouching for a mix of old and new files.
    store.delete(f"{prefix}/{MANIFEST}")
    skip_top = set(LOCAL_ONLY.get(stage, ()))
    count = 0
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (
            not path.is_file()
            or rel.as_posix() == MANIFEST
            or rel.parts[0] in skip_top
            or rel.name.startswith(".")
            or rel.name.endswith(".tmp")
        ):
            continue
        store.put_file(f"{prefix}/{rel.as_posix()}", path)
        count += 1
    store.put_file(f"{prefix}/{MANIFEST}", folder / MANIFEST)
    return count + 1


def partial_prefix(job_id: str, stage: str) -> str:
    """Where a stage's resumable, unfinished state is mirrored (distill's training state)."""
    return f"jobs/{job_id}/{stage}.partial"


def upload_training_state(store: ObjectStore, job_id: str, folder: Path) -> int:
    """Mirror distill's resumable state (state/, best/ and the run's fingerprint) to the store.

    The stored fingerprint is removed first and written last: it vouches for a complete set.
    """
    prefix = partial_prefix(job_id, "distill")
    store.delete(f"{prefix}/fingerprint")
    count = 0
    for top in ("best", "state"):
        for path in sorted((folder / top).rglob("*")):
            if path.is_file() and not path.name.endswith(".tmp"):
                store.put_file(f"{prefix}/{path.relative_to(folder).as_posix()}", path)
                count += 1
    store.put_bytes(f"{prefix}/fingerprint", (folder / ".fingerprint").read_bytes())
    return count


def restore_training_state(
    store: ObjectStore, job_id: str, folder: Path, fingerprint: str
) -> bool:
    """Replace the local distill folder with the mirrored training state of this same run, when
    there is one; True if so.

    A redelivered distill then resumes after the last mirrored epoch on whichever host it lands
    (ml_core resumes when folder/.fingerprint matches). The mirror wins over a local state even
    for the same run: a task that went A -> B -> A finds A's state older than the mirror, while
    the mirror trails a host's own state by at most the epoch a crash cut before its upload.
    """
    started_for = folder / ".fingerprint"
    prefix = partial_prefix(job_id, "distill")
    try:
        stored = store.get_bytes(f"{prefix}/fingerprint").decode()
    except ObjectNotFound:
        return False
    if stored != fingerprint:
        return False  # a state left by different inputs: ml_core would ignore it anyway
    # Start clean: checkpoints of different epochs have the same size, so a size-based
    # "already here" check would keep a stale local file.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    copy_store_to_tree(store, prefix, folder, skip=("fingerprint",))
    started_for.write_text(fingerprint)
    return True


class TrainingStateMirror:
    """A ProgressFn wrapper for distill: after each training checkpoint, mirror the state.

    ml_core writes state/checkpoint.pt after every epoch; the next progress call sees the new
    file and uploads it, so at most one epoch is lost when a worker's host disappears.
    """

    def __init__(self, inner: ProgressFn, store: ObjectStore, job_id: str, folder: Path) -> None:
        from ml_core.training import STATE_FILE

        self.inner, self.store, self.job_id, self.folder = inner, store, job_id, folder
        self.state_file = folder / "state" / STATE_FILE
        self._mirrored = self._version()

    def _version(self) -> int | None:
        try:
            return self.state_file.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def __call__(self, fraction: float, message: str) -> None:
        self.inner(fraction, message)
        version = self._version()
        if version is not None and version != self._mirrored:
            upload_training_state(self.store, self.job_id, self.folder)
            self._mirrored = version


def fetch_input(store: ObjectStore, key: str, dest: Path) -> Path:
    """Download an input file unless an identical-size copy is already there."""
    if not (dest.is_file() and dest.stat().st_size == store.size(key)):
        store.get_file(key, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# The task


@celery_app.task(
    name=TASK_RUN_STAGE,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    # Retries are counted by hand: TRANSIENT_RETRIES for the stage's own errors (in the
    # transient_retries argument), none for waiting on a busy stage or for recording an
    # outcome (see _retry_recording).
    max_retries=None,
)
def run_stage(self: Any, job_id: str, stage: str, transient_retries: int = 0) -> str:
    """Run one stage of one job (see the module docstring); returns what happened."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    delivery = getattr(self.request, "delivery_info", None) or {}
    redelivered = bool(delivery.get("redelivered"))
    settings, owner = get_settings(), lease_owner()
    try:
        inputs = _claim(job_id, stage, redelivered, owner, settings.lease_ttl_s)
        if inputs is None:
            return "dropped"
        with LeaseKeeper(job_id, owner, settings.lease_ttl_s):
            return StageRun(inputs, stage, settings, owner).run()
    except StageBusy as busy:
        wait = lease_wait_s(settings)
        log.info("%s; trying again in %.0fs", busy, wait)
        raise self.retry(countdown=wait) from busy
    except LeaseLost as lost:
        log.warning("%s; this copy stops", lost)
        return "superseded"
    except JobCancelled:
        try:
            mark_cancelled(job_id, stage, f"cancelled during {stage}")
        except Exception as error:
            raise _retry_recording(self, job_id, stage, "cancel", error) from error
        return "cancelled"
    except SystemExit:
        # billiard turns the SIGTERM of revoke(terminate=True) (and of a cold shutdown) into
        # SystemExit in the pool process. Record a cancel; a shutdown leaves the job alone.
        _on_terminated(job_id, stage)
        raise
    except Exception as error:
        if _is_transient(error) and transient_retries < TRANSIENT_RETRIES:
            log.warning("job %s %s: transient error, retrying: %s", job_id, stage, error)
            raise self.retry(
                kwargs={"transient_retries": transient_retries + 1},
                exc=error,
                countdown=10 * (transient_retries + 1),
            ) from error
        try:
            _record_failure(job_id, stage, error)
        except Exception as recording:
            raise _retry_recording(self, job_id, stage, "failure", recording) from error
        return "failed"


def _retry_recording(task: Any, job_id: str, stage: str, what: str, error: Exception) -> Any:
    """The stage's outcome could not be written (the database is down): send the task again.

    Acknowledging it instead would leave the row `running` (or `cancelling`) with no task to
    ever finish it. The retried delivery goes through _claim once the database is back: a
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


def lease_wait_s(settings: Settings) -> float:
    """How long a delivery that found its stage busy waits before looking again; also how
    often workers sweep for lapsed leases."""
    return min(60.0, settings.lease_ttl_s / 2)


def _on_terminated(job_id: str, stage: str) -> None:
    """The pool process is being terminated mid-stage: finish a requested cancel.

    A terminate that is not a cancel (cold shutdown) leaves the row untouched: the message is
    not acknowledged, so the broker redelivers the stage to another worker.
    """
    try:
        with session_scope() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
        if status == JobStatus.CANCELLING:
            mark_cancelled(job_id, stage, f"cancelled during {stage} (task terminated)")
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


def _record_failure(job_id: str, stage: str, error: Exception) -> None:
    """Mark the job failed: ml_core errors with their message, anything else as internal."""
    code = _ml_error_code(error)
    if code is not None:
        detail, data = str(error), {"exception": type(error).__name__}
        log.warning("job %s failed in %s: %s", job_id, stage, error)
    else:
        # The traceback goes into the event (operators), never into the API's error detail.
        code, detail = "internal_error", f"the {stage} stage failed unexpectedly"
        data = {
            "exception": type(error).__name__,
            "message": str(error)[:2000],
            "traceback": traceback.format_exc()[-8000:],
        }
        log.exception("job %s failed in %s", job_id, stage)
    _mark_failed(job_id, stage, code, detail, data)


def _ml_error_code(error: Exception) -> str | None:
    """An error code for the errors ml_core raises on bad inputs or settings, else None."""
    if isinstance(error, StageError):
        return getattr(error, "code", "stage_failed")
    name = type(error).__name__
    if name == "CorpusError":
        return "invalid_corpus"
    if name == "ValidationError":
        return "invalid_recipe"
    if isinstance(error, KeyError) and "model" in str(error).lower():
        return "unknown_model"
    return None


class StageRun:
    """One execution of one stage for one job."""

    def __init__(
        self, inputs: JobInputs, stage: str, settings: Settings, owner: str | None = None
    ) -> None:
        self.inputs, self.stage, self.settings = inputs, stage, settings
        self.owner = owner
        self.job_id = inputs.job_id
        self.store = store_for(settings)
        self.workdir = Path(settings.work_dir) / self.job_id
        self.config = RecipeConfig.model_validate(inputs.recipe)

    def run(self) -> str:
        index = STAGES.index(self.stage)
        for upstream in STAGES[:index]:
            sync_stage_down(self.store, self.job_id, upstream, self.workdir / upstream)
        ctx = self._context()
        stored = self._stored_manifest()
        fingerprint = stage_fingerprint(self.stage, ctx)
        if stored is not None and stored.get("fingerprint") == fingerprint:
            # Finished and uploaded by an earlier delivery: only the bookkeeping is left.
            outcome = {
                "skipped": True,
                "counts": stored.get("counts", {}),
                "metrics": stored.get("metrics", {}),
                "seconds": stored.get("seconds"),
            }
            if self.stage == "evaluate":
                sync_stage_down(self.store, self.job_id, self.stage, self.workdir / self.stage)
        else:
            folder = self.workdir / self.stage
            mirrored = self.stage == "distill"  # the one stage with state worth resuming
            if mirrored:
                if restore_training_state(self.store, self.job_id, folder, fingerprint):
                    log.info("job %s: resuming distill from the mirrored state", self.job_id)
                ctx = replace(
                    ctx, progress=TrainingStateMirror(ctx.progress, self.store, self.job_id, folder)
                )
            result = run_pipeline_stage(self.stage, ctx)
            self._raise_if_cancelled()
            upload_stage(self.store, self.job_id, self.stage, folder)
            if mirrored:
                self.store.delete_prefix(partial_prefix(self.job_id, self.stage))
            outcome = {
                "skipped": False,
                "counts": result.manifest.get("counts", {}),
                "metrics": result.metrics,
                "seconds": result.manifest.get("seconds"),
            }
        self._record_stage(outcome)
        if index + 1 < len(STAGES):
            self._advance(STAGES[index + 1])
            return "advanced"
        self._finish()
        return "succeeded"

    def _context(self) -> StageContext:
        inputs_dir = self.workdir / "inputs"
        corpus_path = inputs_dir / Path(self.inputs.corpus_key).name
        # Only prepare reads (and fingerprints) the corpus, only generate the customer's own
        # training queries, only evaluate the judgements.
        if self.stage == "prepare":
            fetch_input(self.store, self.inputs.corpus_key, corpus_path)
        train_queries = None
        if self.inputs.train_queries_key:
            train_queries = inputs_dir / "train" / Path(self.inputs.train_queries_key).name
            if self.stage == "generate":
                fetch_input(self.store, self.inputs.train_queries_key, train_queries)
        eval_queries = eval_qrels = None
        if self.inputs.eval_queries_key and self.inputs.eval_qrels_key:
            eval_queries = inputs_dir / "eval" / Path(self.inputs.eval_queries_key).name
            eval_qrels = inputs_dir / "eval" / Path(self.inputs.eval_qrels_key).name
            if self.stage == "evaluate":
                fetch_input(self.store, self.inputs.eval_queries_key, eval_queries)
                fetch_input(self.store, self.inputs.eval_qrels_key, eval_qrels)
        return StageContext(
            workdir=self.workdir,
            corpus_path=corpus_path,
            config=self.config,
            registry=ModelRegistry(Path(self.settings.model_store)),
            eval_queries=eval_queries,
            eval_qrels=eval_qrels,
            train_queries=train_queries,
            progress=ProgressReporter(
                self.job_id, self.stage, self.settings.progress_interval_s, self.owner
            ),
        )

    def _stored_manifest(self) -> dict[str, Any] | None:
        try:
            raw = self.store.get_bytes(f"{stage_prefix(self.job_id, self.stage)}/{MANIFEST}")
        except ObjectNotFound:
            return None
        return json.loads(raw)

    def _raise_if_cancelled(self) -> None:
        """Before each step that publishes (upload, next stage, model): stop if the job was
        cancelled, or if another delivery took this stage over (LeaseLost): two copies must not
        upload over each other."""
        with session_scope() as session:
            row = session.execute(
                select(Job.status, Job.lease_owner).where(Job.id == self.job_id)
            ).one_or_none()
        status, holder = row if row is not None else (None, None)
        if status in (JobStatus.CANCELLING, JobStatus.CANCELLED, None):
            raise JobCancelled(self.job_id)
        _raise_if_taken_over(self.job_id, self.stage, self.owner, holder)

    def _record_stage(self, outcome: dict[str, Any]) -> None:
        with session_scope() as session:
            job = _locked_job(session, self.job_id)
            if job is None:
                raise JobCancelled(self.job_id)
            metrics = dict(job.metrics or {})
            stages = dict(metrics.get("stages", {}))
            stages[self.stage] = {k: outcome[k] for k in ("counts", "metrics", "seconds")}
            metrics["stages"] = stages
            job.metrics = metrics  # a new dict: JSON columns do not track in-place changes
            done = stage_offset(self.stage) + STAGE_WEIGHTS[self.stage]
            job.progress = max(job.progress or 0.0, done)
            verb = "skipped (already finished)" if outcome["skipped"] else "finished"
            add_event(
                session,
                self.job_id,
                EventKind.STAGE,
                f"{self.stage} {verb}",
                stage=self.stage,
                progress=job.progress,
                data={
                    "skipped": outcome["skipped"],
                    "seconds": outcome["seconds"],
                    "counts": outcome["counts"],
                },
            )
            if outcome["metrics"]:
                add_event(
                    session,
                    self.job_id,
                    EventKind.METRIC,
                    f"{self.stage} metrics",
                    stage=self.stage,
                    data=outcome["metrics"],
                )

    def _advance(self, next_stage: str) -> None:
        """Send the next stage, then point the row at it.

        Send first: a crash between the two leaves a duplicate task at worst, never a job with
        no task. The duplicate waits on the lease while the first copy runs the stage and is
        dropped as stale by _claim once that copy has advanced the job.
        """
        self._raise_if_cancelled()
        task_id = send_stage(self.job_id, next_stage)
        with session_scope() as session:
            session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.status == JobStatus.RUNNING)
                .values(stage=next_stage, celery_task_id=task_id)
            )

    def _finish(self) -> None:
        """Archive the tuned model, create its row and mark the job succeeded."""
        self._raise_if_cancelled()
        report = json.loads((self.workdir / "evaluate" / "report.json").read_text())
        model_dir = self.workdir / "distill" / "model"
        model_id = self._reserve_model_id()
        object_key = f"models/{model_id}/model.tar.gz"
        folder_key = f"models/{model_id}/model/"
        archive = self.workdir / "export" / "model.tar.gz"
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "w:gz") as tar:
            # One top-level folder named after the model, so extracting never spills files.
            tar.add(model_dir, arcname=model_id)
        for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            self.store.put_file(folder_key + path.relative_to(model_dir).as_posix(), path)
        self.store.put_file(object_key, archive)

        recommended = report.get("recommended", "base")
        tuned_metrics = dict(report.get("tuned", {}))
        job_metrics = {
            key: report[key]
            for key in (
                "base",
                "tuned",
                "gain",
                "significance",
                "warnings",
                "per_query_type",
                "teacher_check",
                "judgements",
                "base_kept",
            )
            if key in report
        }
        with session_scope() as session:
            job = _locked_job(session, self.job_id)
            if job is None or job.status != JobStatus.RUNNING:
                raise JobCancelled(self.job_id)
            if session.get(TunedModel, model_id) is None:
                session.add(
                    TunedModel(
                        id=model_id,
                        tenant_id=job.tenant_id,
                        job_id=job.id,
                        name=str(self.inputs.spec.get("name") or f"{self.config.student}-{job.id}"),
                        base_model=self.config.student,
                        object_key=object_key,
                        folder_key=folder_key,
                        dim=_model_dim(model_dir),
                        metrics={**tuned_metrics, "gain": report.get("gain", {})},
                        recommended=recommended == "tuned",
                    )
                )
            job.metrics = {**(job.metrics or {}), **job_metrics}
            job.recommended = Recommendation(recommended)
            job.status = JobStatus.SUCCEEDED
            job.progress = 1.0
            job.finished_at = utcnow()
            warnings = [str(w) for w in report.get("warnings", [])]
            if recommended != "tuned" and not any("base" in w for w in warnings):
                add_event(
                    session,
                    job.id,
                    EventKind.WARNING,
                    "the tuned model does not beat its base model on evaluation; "
                    "the base model stays the recommendation",
                    stage="evaluate",
                    data={"gain": report.get("gain", {})},
                )
            for warning in warnings:
                add_event(session, job.id, EventKind.WARNING, warning, stage="evaluate")
            add_event(
                session,
                job.id,
                EventKind.STATUS,
                "succeeded",
                progress=1.0,
                data={"status": "succeeded", "model_id": model_id, "recommended": recommended},
            )

    def _reserve_model_id(self) -> str:
        """The job's model id, chosen once: a redelivered evaluate reuses it (no orphans)."""
        with session_scope() as session:
            job = _locked_job(session, self.job_id)
            if job is None:
                raise JobCancelled(self.job_id)
            if job.model_id is None:
                job.model_id = new_id("mdl")
            return job.model_id


def _model_dim(model_dir: Path) -> int:
    """Embedding size from the sentence-transformers pooling config (or the model spec)."""
    pooling = model_dir / "1_Pooling" / "config.json"
    if pooling.is_file():
        return int(json.loads(pooling.read_text())["word_embedding_dimension"])
    spec = json.loads((model_dir / "tailor-model.json").read_text())
    return int(spec["dim"])


# ---------------------------------------------------------------------------------------------
# Worker process hooks


@signals.worker_process_init.connect
def _fresh_connections_after_fork(**_: Any) -> None:
    """A forked pool process must not reuse the parent's database connections."""
    get_engine().dispose(close=False)


@signals.task_revoked.connect
def _cancel_revoked_job(request: Any = None, terminated: bool = False, **_: Any) -> None:
    """In the worker's main process: a revoked stage task of a cancelling job cancels it.

    Covers the task revoked before it started (the worker drops it without running any of our
    code) and a pool process killed before it could record the cancel itself.
    """
    args = getattr(request, "args", None) or ()
    kwargs = getattr(request, "kwargs", None) or {}
    job_id = kwargs.get("job_id") or (args[0] if args else None)
    stage = kwargs.get("stage") or (args[1] if len(args) > 1 else None)
    if not job_id:
        return
    try:
        with session_scope() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
        if status == JobStatus.CANCELLING:
            how = "terminated" if terminated else "revoked"
            mark_cancelled(job_id, stage, f"cancelled ({stage} task {how})")
    except Exception:
        log.exception("could not record the revoke of job %s", job_id)


def sweep_lapsed_leases(lease_ttl_s: float | None = None) -> list[str]:
    """Re-send the current stage of every job whose lease lapsed; returns their ids.

    A lapsed lease means the process running the stage stopped renewing it for lease_ttl_s:
    its host died or lost the database. The broker would redeliver that task only after the
    visibility timeout (hours); this resumes the job within about one lease_ttl_s instead. Any
    number of workers may sweep at once: the conditional update lets one of them re-send.
    A late redelivery of the original task then finds the stage taken (it waits on the lease)
    or finished (dropped as stale).
    """
    ttl = lease_ttl_s if lease_ttl_s is not None else get_settings().lease_ttl_s
    alive = [JobStatus.RUNNING, JobStatus.CANCELLING]
    with session_scope() as session:
        lapsed = session.execute(
            select(Job.id, Job.stage, Job.lease_owner).where(
                Job.status.in_(alive), Job.lease_expires_at < utcnow()
            )
        ).all()
    resent: list[str] = []
    for job_id, stage, holder in lapsed:
        now = utcnow()
        sent_before = requeues(holder)
        wait_s = ttl * min(2**sent_before, MAX_REQUEUE_BACKOFF)
        with session_scope() as session:
            won = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.status.in_(alive),
                    Job.lease_expires_at < now,
                    Job.lease_owner == holder,
                )
                .values(
                    lease_owner=f"{REQUEUED}:{sent_before + 1}",
                    lease_expires_at=now + timedelta(seconds=wait_s),
                )
            ).rowcount
            if won:
                message = (
                    f"{stage} was sent again {sent_before} time(s) and no worker has taken it; "
                    f"sending it again (next check in {wait_s:.0f} s)"
                    if sent_before
                    else f"{stage} stopped renewing its lease ({holder}); sending it again"
                )
                add_event(
                    session,
                    job_id,
                    EventKind.WARNING,
                    message,
                    stage=stage,
                    data={"lease_owner": holder, "resends": sent_before + 1},
                )
        if won:
            log.warning("job %s: %s's lease lapsed (%s); re-sending it", job_id, stage, holder)
            task_id = send_stage(job_id, stage or STAGES[0])
            with session_scope() as session:  # what a cancel revokes from now on
                session.execute(update(Job).where(Job.id == job_id).values(celery_task_id=task_id))
            resent.append(job_id)
    return resent


def _sweep_forever(interval_s: float) -> None:
    while True:
        time.sleep(interval_s)
        try:
            sweep_lapsed_leases()
        except Exception as error:  # the database or broker is down: try again next time
            log.warning("lease sweep failed: %s", error)


@signals.worker_ready.connect
def _start_lease_sweeper(**_: Any) -> None:
    """In the worker's main process: sweep for lapsed leases every lease_ttl_s / 2 (at most a
    minute), so a job whose worker host died resumes without waiting for the broker."""
    interval = lease_wait_s(get_settings())
    threading.Thread(
        target=_sweep_forever, args=(interval,), name="lease-sweeper", daemon=True
    ).start()


@signals.worker_ready.connect
def _recover_embedded_jobs(**_: Any) -> None:
    """Embedded default only: re-send the current stage of jobs a dead worker left running.

    kombu's filesystem transport removes a message's file when a worker takes it and has no
    visibility timeout, so a worker killed mid-stage loses its task for good. The embedded
    set-up runs one worker, so when it starts, any job still `running` (or `cancelling`) has no
    live task: sending its stage again resumes it (finished stages are skipped by manifest; a
    duplicate, if the old task had already sent one, is dropped as stale by `_claim`).
    Redis redelivers by itself (visibility timeout), so production never does this.
    """
    settings = get_settings()
    if not settings.broker_url.startswith("filesystem:"):
        return
    try:
        with session_scope() as session:
            rows = session.execute(
                select(Job.id, Job.stage).where(
                    Job.status.in_([JobStatus.RUNNING, JobStatus.CANCELLING])
                )
            ).all()
        for job_id, stage in rows:
            log.warning("resuming job %s at %s (left running by a stopped worker)", job_id, stage)
            send_stage(job_id, stage or STAGES[0])
    except Exception:
        log.exception("could not resume interrupted jobs")
