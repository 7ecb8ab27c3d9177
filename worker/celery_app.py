"""The Celery application: broker, delivery guarantees and the cpu/gpu queue split.

Start a worker with

    celery -A worker.celery_app worker -P prefork -c 1 -Q cpu,gpu,webhooks \
        --without-gossip --without-mingle

Delivery: a stage task is acknowledged only after it returns (acks_late), a worker holds one
unacknowledged task at a time (prefetch 1), and a task whose pool process dies is put back on
the queue (reject_on_worker_lost). When a whole worker host dies, the broker redelivers its
unacknowledged task after `visibility_timeout` seconds; stages are idempotent (manifests), so
the redelivered task resumes the job where it stopped.

Results: no result backend by default. The database is the record of every job (status,
stage, progress, events), so Celery results would only duplicate it;
TAILOR_RESULT_BACKEND_URL turns one on for operators who want Flower-style task inspection.

This module is imported by the API (to send tasks), so it must stay light: no torch, no
ml_core stages. The worker imports the stage task and its signal hooks through `include`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Queue

from app.settings import Settings, get_settings

TASK_RUN_STAGE = "worker.tasks.run_stage"
# A bulk embedding job is one task (worker.embedding_run): encoding a corpus wants a GPU.
TASK_EMBED_CORPUS = "worker.tasks.embed_corpus"
EMBED_STAGE = "embed"
EMBED_QUEUE = "gpu"
# Webhook deliveries have a queue of their own, so a receiver's retries never wait behind a
# stage on a busy worker that also serves them (docs/operations.md, "Webhooks").
TASK_DELIVER_WEBHOOK = "worker.webhooks.deliver"
WEBHOOK_QUEUE = "webhooks"

# Light stages run on any machine; generation, teacher scoring and training want a GPU.
# Kept here rather than imported from ml_core.pipeline so the API never imports ml_core to
# send a task (tests check both agree).
STAGE_QUEUES: dict[str, str] = {
    "prepare": "cpu",
    "generate": "gpu",
    "filter": "gpu",
    "distill": "gpu",
    "evaluate": "cpu",
}
FIRST_STAGE = "prepare"
QUEUES = ("cpu", "gpu", WEBHOOK_QUEUE)


# The worker as deployed: prefork (the only pool that can terminate a running task), one
# process per worker (stages are CPU/GPU-bound), every queue. After `celery` or `python -m celery`.
WORKER_ARGS: tuple[str, ...] = (
    "-A",
    "worker.celery_app",
    "worker",
    "-P",
    "prefork",
    "-c",
    "1",
    "-Q",
    ",".join(QUEUES),
    "--without-gossip",
    "--without-mingle",
    "--loglevel",
    "INFO",
)


def queue_for(stage: str) -> str:
    """The queue a stage's task is sent to; KeyError for an unknown stage."""
    return STAGE_QUEUES[stage]


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options for the configured broker (folders for the filesystem transport)."""
    if settings.broker_url.startswith("filesystem:"):
        # The filesystem transport keeps each message as a file. Producer and consumer share
        # one folder; the control folder holds exchange bindings (remote control, revoke).
        root = Path(settings.broker_dir)
        folders = {"queue": root / "queue", "control": root / "control"}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "control_folder": str(folders["control"]),
            "store_processed": False,
        }
    visibility = settings.visibility_timeout
    prefix = {"global_keyprefix": settings.broker_key_prefix} if settings.broker_key_prefix else {}
    return {
        **prefix,
        "visibility_timeout": visibility,
        # kombu sweeps for expired unacknowledged messages every interval * throttle seconds
        # (100 s by default). Sweep a few times per visibility timeout instead, so a short
        # timeout (tests, small stages) really redelivers within about that time.
        "unacked_restore_interval": max(1, min(60, visibility // 4)),
        "unacked_restore_throttle": 1,
        # A broker that vanishes without closing TCP must not hang a publish forever.
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
    }


def configure(app: Celery, settings: Settings) -> None:
    """Apply the settings to a Celery app (also used by tests to build apps per config)."""
    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        result_backend=settings.result_backend_url,
        task_ignore_result=settings.result_backend_url is None,
        task_serializer="json",
        accept_content=["json"],
        # Delivery guarantees (see the module docstring).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # If the broker connection drops, the broker will redeliver our unacknowledged task
        # anyway; stopping the running copy avoids two workers running the same stage.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_queues=[Queue(name, routing_key=name) for name in QUEUES],
        task_default_queue="cpu",
        task_routes=(_route_stage,),
        # Long ML stages: never let the worker's own time limits kill them.
        task_time_limit=None,
        task_soft_time_limit=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )


def _route_stage(
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: dict[str, Any],
    task: Any = None,
    **_: Any,
) -> dict[str, str] | None:
    """Route run_stage(job_id, stage) by its stage argument, embed_corpus to the GPU queue (an
    explicit queue wins)."""
    if options.get("queue"):
        return None
    if name == TASK_EMBED_CORPUS:
        return {"queue": EMBED_QUEUE, "routing_key": EMBED_QUEUE}
    if name == TASK_DELIVER_WEBHOOK:
        return {"queue": WEBHOOK_QUEUE, "routing_key": WEBHOOK_QUEUE}
    if name != TASK_RUN_STAGE:
        return None
    stage = kwargs.get("stage") if kwargs else None
    if stage is None and args and len(args) > 1:
        stage = args[1]
    queue = STAGE_QUEUES.get(stage) if isinstance(stage, str) else None
    return {"queue": queue, "routing_key": queue} if queue else None


def create_app(settings: Settings | None = None) -> Celery:
    """A configured Celery app; the worker entry point includes the stage task and hooks."""
    app = Celery(
        "tailor", include=["worker.tasks", "worker.signals", "worker.webhooks", "worker.metrics"]
    )
    configure(app, settings or get_settings())
    return app


celery_app = create_app()
app = celery_app  # `celery -A worker.celery_app` finds `app` or `celery_app`
