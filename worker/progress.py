"""Progress: one overall figure for the job from each stage's own fraction, written to the row
at most about once a second, with sparser progress events on the job's timeline. Each write also
reads the row, so a cancel (or a lost lease) stops the stage at its next report."""

from __future__ import annotations

import time

from sqlalchemy import update

from app.db.models import EventKind, job_tables
from app.db.session import session_scope
from app.jobs.lifecycle import add_event
from ml_core.pipeline import STAGES
from worker.leases import raise_if_stopped

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


def stage_offset(stage: str) -> float:
    """Overall progress when `stage` starts."""
    return sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(stage)])


def stage_end(stage: str) -> float:
    """Overall progress when `stage` has finished."""
    return stage_offset(stage) + STAGE_WEIGHTS[stage]


class ProgressReporter:
    """The ProgressFn handed to a stage: throttled progress writes, events and cancel checks.

    The job's overall progress is the stage's share of it (`span`: where the stage starts and
    how much of the job it is; by default a training stage's STAGE_WEIGHTS)."""

    def __init__(
        self,
        job_id: str,
        stage: str,
        interval_s: float = 1.0,
        owner: str | None = None,
        span: tuple[float, float] | None = None,
    ) -> None:
        # Progress is written, and the row's status read to notice a cancel, at most every
        # interval_s: about once a second keeps cancel prompt and the database quiet.
        self.job_id, self.stage, self.interval_s = job_id, stage, interval_s
        self.owner = owner  # this process's lease: lost to another delivery -> LeaseLost
        self.offset, self.weight = span or (stage_offset(stage), STAGE_WEIGHTS[stage])
        self.model, _ = job_tables(job_id)
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
        overall = self.offset + self.weight * fraction
        tenth = int(fraction * 10)
        want_event = message != self._last_message and (
            tenth != self._last_event_tenth or now - self._last_event >= PROGRESS_EVENT_INTERVAL_S
        )
        with session_scope() as session:
            job = session.get(self.model, self.job_id)
            raise_if_stopped(job, self.job_id, self.stage, self.owner)
            # A redelivered stage reports again from 0: never move the bar backwards.
            session.execute(
                update(self.model)
                .where(self.model.id == self.job_id, self.model.progress < overall)
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
