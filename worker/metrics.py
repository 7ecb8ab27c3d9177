"""A worker's Prometheus metrics, served on TAILOR_WORKER_METRICS_PORT (0: none).

Why a port and multiprocess files together: tasks run in prefork pool processes, which a
scraper cannot reach and which Celery replaces at will, so their figures (stage durations,
webhook attempts) are written by prometheus_client's multiprocess mode to files in a folder
of this worker's own, and the worker's main process — the one long-lived process with a
fixed address — serves the sum of them on its port. What is true of the whole deployment
rather than of one process (jobs by status, queue depth) is read when scraped: from the
database and the broker, so it is right even on a worker that ran nothing.

Set up at `worker_init` (main process, before the pool forks): the folder and the value class
must be in place before the metrics are created, and the pool inherits them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import signals
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.db.models import EmbeddingJob, Job
from app.db.session import session_scope
from app.settings import Settings, get_settings
from worker.celery_app import (
    EMBED_STAGE,
    QUEUES,
    TASK_DELIVER_WEBHOOK,
    TASK_EMBED_CORPUS,
    TASK_RUN_STAGE,
    broker_transport_options,
)

log = logging.getLogger(__name__)

STAGE_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
# kombu's Redis transport keeps priorities 3, 6, 9 in their own lists beside the queue's.
_PRIORITY_SEP = "\x06\x16"

STAGE_SECONDS: Histogram | None = None
WEBHOOK_ATTEMPTS: Counter | None = None
_started: dict[str, float] = {}
_folder: Path | None = None


def setup(settings: Settings) -> Path:
    """Switch this process (and the pool it forks) to multiprocess metrics in a fresh folder;
    create the task metrics. Returns the folder."""
    global STAGE_SECONDS, WEBHOOK_ATTEMPTS, _folder
    _folder = Path(tempfile.mkdtemp(prefix="tailor-worker-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_folder)
    values.ValueClass = values.MultiProcessValue()
    STAGE_SECONDS = Histogram(
        "tailor_stage_duration_seconds",
        "Wall time of each stage task run, by stage and what happened (advanced, succeeded, "
        "failed, cancelled, dropped...).",
        ("stage", "outcome"),
        buckets=STAGE_BUCKETS,
    )
    WEBHOOK_ATTEMPTS = Counter(
        "tailor_webhook_deliveries_total",
        "Webhook delivery tasks by what happened (succeeded, retrying, failed, stale...).",
        ("outcome",),
    )
    return _folder


class StateCollector(Collector):
    """Jobs by kind and status (database) and messages waiting per queue (broker), read when
    scraped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("tailor_jobs", "Jobs by kind and status (all time).",
                                 labels=("kind", "status"))
        try:
            with session_scope() as session:
                for kind, model in (("training", Job), ("embedding", EmbeddingJob)):
                    rows = session.execute(
                        select(model.status, func.count()).group_by(model.status)
                    ).all()
                    for status, count in rows:
                        jobs.add_metric([kind, str(getattr(status, "value", status))], count)
        except Exception:
            log.warning("metrics: could not count jobs", exc_info=True)
        yield jobs
        depth = GaugeMetricFamily("tailor_queue_depth", "Tasks waiting in each broker queue "
                                  "(not counting those a worker has taken).", labels=("queue",))
        try:
            for queue, count in queue_depths(self.settings).items():
                depth.add_metric([queue], count)
        except Exception:
            log.warning("metrics: could not read the queue depths", exc_info=True)
        yield depth


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in each queue of the configured broker."""
    if settings.broker_url.startswith("filesystem:"):
        folder = Path(broker_transport_options(settings)["data_folder_in"])
        names = [path.name for path in folder.iterdir()]
        return {q: sum(name.endswith(f".{q}.msg") for name in names) for q in QUEUES}
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
    try:
        prefix = settings.broker_key_prefix
        return {
            queue: sum(
                int(client.llen(prefix + (queue if p == 0 else f"{queue}{_PRIORITY_SEP}{p}")))
                for p in (0, 3, 6, 9)
            )
            for queue in QUEUES
        }
    finally:
        client.close()


def _stage_of(task: Any, args: Any, kwargs: Any) -> str | None:
    name = getattr(task, "name", "")
    if name == TASK_RUN_STAGE:
        stage = (kwargs or {}).get("stage") or (args[1] if args and len(args) > 1 else None)
        return str(stage) if stage else None
    if name == TASK_EMBED_CORPUS:
        return EMBED_STAGE
    return None


@signals.worker_init.connect
def _setup(**_: Any) -> None:
    settings = get_settings()
    if settings.worker_metrics_port:
        setup(settings)


@signals.worker_ready.connect
def _serve(**_: Any) -> None:
    settings = get_settings()
    if not settings.worker_metrics_port or _folder is None:
        return
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(_folder))
    registry.register(StateCollector(settings))
    try:
        start_http_server(settings.worker_metrics_port, settings.worker_metrics_host,
                          registry=registry)
    except OSError as error:  # e.g. a second worker on this host given the same port
        log.error("metrics: cannot listen on %s:%d (%s); this worker serves no metrics",
                  settings.worker_metrics_host, settings.worker_metrics_port, error)
        return
    log.info("metrics on http://%s:%d/metrics", settings.worker_metrics_host,
             settings.worker_metrics_port)


@signals.worker_shutdown.connect
def _remove_folder(**_: Any) -> None:
    if _folder is not None:
        shutil.rmtree(_folder, ignore_errors=True)


@signals.task_prerun.connect
def _task_started(task_id: str = "", **_: Any) -> None:
    if STAGE_SECONDS is not None:
        _started[task_id] = time.monotonic()


@signals.task_postrun.connect
def _task_finished(task_id: str = "", task: Any = None, args: Any = None, kwargs: Any = None,
                   retval: Any = None, state: str = "", **_: Any) -> None:
    started = _started.pop(task_id, None)
    if STAGE_SECONDS is None or WEBHOOK_ATTEMPTS is None:
        return
    outcome = retval if isinstance(retval, str) else state.lower() or "unknown"
    if getattr(task, "name", "") == TASK_DELIVER_WEBHOOK:
        WEBHOOK_ATTEMPTS.labels(outcome).inc()
        return
    stage = _stage_of(task, args, kwargs)
    if stage is not None and started is not None:
        STAGE_SECONDS.labels(stage, outcome).observe(time.monotonic() - started)
