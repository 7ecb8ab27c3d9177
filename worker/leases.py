"""The job lease: one live process per running stage, and the sweep that re-sends a stage whose
process stopped renewing it.

The process running a stage holds the job row's lease ("host:pid" until a time) and renews it
from a heartbeat thread. A second delivery of that stage waits while the holder lives; a holder
that stopped renewing (its host died, or lost the database) is taken for dead, and the sweep
re-sends its stage within about one lease_ttl_s instead of the broker's visibility timeout.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from app.db.base import utcnow
from app.db.models import AnyJob, EmbeddingJob, EventKind, Job, JobStatus, job_tables
from app.db.session import session_scope
from app.jobs.lifecycle import JobCancelled, add_event
from app.settings import Settings, get_settings
from worker.dispatch import resend

log = logging.getLogger(__name__)

# The owner the lease sweeper writes when it re-sends a stage whose holder stopped renewing:
# "requeued:N", N the re-sends in a row that no task has claimed yet. No process holds it, so
# the re-sent task claims it at once. Other sweepers leave the job alone for lease_ttl_s, then
# twice that, and so on up to MAX_REQUEUE_BACKOFF times: a re-sent task that is only waiting in
# a long queue is not sent again every lease period, and one that was lost is still replaced.
REQUEUED = "requeued"
MAX_REQUEUE_BACKOFF = 16


class LeaseLost(Exception):
    """Another delivery has taken over the stage (this process's heartbeat lapsed, so it was
    taken for dead): stop without touching the row."""


def requeues(holder: str | None) -> int:
    """How many times in a row the sweep has re-sent the stage without a task claiming it."""
    marker, _, count = (holder or "").partition(":")
    if marker != REQUEUED:
        return 0
    return int(count) if count.isdigit() else 1  # bare "requeued": written before counting


def lease_owner() -> str:
    """This process as a lease holder: "host:pid"."""
    return f"{socket.gethostname()}:{os.getpid()}"


def lease_wait_s(settings: Settings) -> float:
    """How long a delivery that found its stage busy waits before looking again; also how
    often workers sweep for lapsed leases."""
    return min(60.0, settings.lease_ttl_s / 2)


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


def lease_held_by_another(job: AnyJob, owner: str) -> bool:
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


def raise_if_stopped(job: AnyJob | None, job_id: str, stage: str, owner: str | None) -> None:
    """JobCancelled when the job row says cancelled or cancelling (or is gone); LeaseLost when
    another delivery now holds the lease `owner` took."""
    if job is None or job.status in (JobStatus.CANCELLING, JobStatus.CANCELLED):
        raise JobCancelled(job_id)
    if owner and job.lease_owner not in (None, owner):
        raise LeaseLost(f"job {job_id} {stage} taken over by {job.lease_owner}")


class LeaseKeeper:
    """A heartbeat thread renewing the job's lease while this process runs its stage."""

    def __init__(self, job_id: str, owner: str, ttl_s: float) -> None:
        self.job_id, self.owner, self.ttl_s = job_id, owner, ttl_s
        self.model, _ = job_tables(job_id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def renew(self) -> bool:
        """Push the lease's expiry on; False when this process no longer holds it."""
        with session_scope() as session:
            renewed = session.execute(
                update(self.model)
                .where(self.model.id == self.job_id, self.model.lease_owner == self.owner)
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
                    update(self.model)
                    .where(self.model.id == self.job_id, self.model.lease_owner == self.owner)
                    .values(**values)
                )
        except Exception as error:
            log.warning("job %s: could not give up its lease: %s", self.job_id, error)


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
    lapsed = []
    with session_scope() as session:
        for model in (Job, EmbeddingJob):
            lapsed += session.execute(
                select(model.id, model.stage, model.lease_owner).where(
                    model.status.in_(alive), model.lease_expires_at < utcnow()
                )
            ).all()
    resent: list[str] = []
    for job_id, stage, holder in lapsed:
        now = utcnow()
        sent_before = requeues(holder)
        wait_s = ttl * min(2**sent_before, MAX_REQUEUE_BACKOFF)
        model, _ = job_tables(job_id)
        with session_scope() as session:
            won = session.execute(
                update(model)
                .where(
                    model.id == job_id,
                    model.status.in_(alive),
                    model.lease_expires_at < now,
                    model.lease_owner == holder,
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
            task_id = resend(job_id, stage)
            with session_scope() as session:  # what a cancel revokes from now on
                session.execute(
                    update(model).where(model.id == job_id).values(celery_task_id=task_id)
                )
            resent.append(job_id)
    return resent


def sweep_forever(interval_s: float) -> None:
    """Sweep for lapsed leases every `interval_s` (a worker's background thread)."""
    while True:
        time.sleep(interval_s)
        try:
            sweep_lapsed_leases()
        except Exception as error:  # the database or broker is down: try again next time
            log.warning("lease sweep failed: %s", error)
