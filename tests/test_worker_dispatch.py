"""Queue routing, the broker probe and revoke, on real brokers (kombu filesystem and Redis)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from celery import Celery

from app.settings import Settings
from tests.service_stack import REDIS_TEST_URL, flush_redis
from worker.celery_app import STAGE_QUEUES, TASK_RUN_STAGE, configure


def _app(settings: Settings) -> Celery:
    app = Celery("tailor-test")
    configure(app, settings)
    return app


def test_every_pipeline_stage_has_a_queue() -> None:
    from ml_core.pipeline import STAGES

    assert tuple(STAGE_QUEUES) == STAGES
    assert {STAGE_QUEUES[s] for s in ("prepare", "evaluate")} == {"cpu"}
    assert {STAGE_QUEUES[s] for s in ("generate", "filter", "distill")} == {"gpu"}


def test_delivery_guarantees_are_configured(tmp_path: Path) -> None:
    app = _app(Settings(broker_url="redis://127.0.0.1:6379/15", visibility_timeout=7200))
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 7200
    assert conf.task_ignore_result and conf.result_backend is None


@pytest.mark.parametrize(("stage", "queue"), sorted(STAGE_QUEUES.items()))
def test_stage_tasks_land_on_their_queue(tmp_path: Path, stage: str, queue: str) -> None:
    # The filesystem transport writes one file per message, named after its queue: a real
    # broker we can look inside without consuming.
    app = _app(Settings(broker_url="filesystem://", broker_dir=tmp_path / "broker"))
    # Routed by the stage argument alone (no explicit queue), as any caller would send it.
    app.send_task(TASK_RUN_STAGE, args=("job_x", stage))
    files = list((tmp_path / "broker" / "queue").iterdir())
    assert [f.name.rpartition(".")[0].rpartition(".")[2] for f in files] == [queue]
    body = json.loads(files[0].read_text())
    assert body["headers"]["task"] == TASK_RUN_STAGE


def test_the_bulk_embedding_task_lands_on_the_gpu_queue(tmp_path: Path) -> None:
    from worker.celery_app import TASK_EMBED_CORPUS

    app = _app(Settings(broker_url="filesystem://", broker_dir=tmp_path / "broker"))
    app.send_task(TASK_EMBED_CORPUS, args=("emb_x",))  # routed by its name alone
    files = list((tmp_path / "broker" / "queue").iterdir())
    assert [f.name.rpartition(".")[0].rpartition(".")[2] for f in files] == ["gpu"]


def test_dispatch_stays_light() -> None:
    # The API imports dispatch; it must not drag torch or the ML stages into the web process.
    import subprocess

    code = (
        "import sys, worker.dispatch; "
        "bad = [m for m in ('torch', 'ml_core.pipeline', 'transformers') if m in sys.modules]; "
        "sys.exit(bool(bad) and print(bad))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_broker_ok_reports_reachability(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import worker.dispatch as dispatch

    monkeypatch.setattr(
        dispatch, "celery_app", _app(Settings(broker_url="redis://127.0.0.1:6379/15"))
    )
    assert dispatch.broker_ok()
    monkeypatch.setattr(dispatch, "celery_app", _app(Settings(broker_url="redis://127.0.0.1:1/0")))
    assert not dispatch.broker_ok(timeout=1)
    fs = _app(Settings(broker_url="filesystem://", broker_dir=tmp_path / "b"))
    monkeypatch.setattr(dispatch, "celery_app", fs)
    assert dispatch.broker_ok()
    # revoke is a broadcast; on a reachable broker it is sent, on a dead one it reports False.
    assert dispatch.revoke("some-task-id", terminate=True)
    monkeypatch.setattr(dispatch, "celery_app", _app(Settings(broker_url="redis://127.0.0.1:1/0")))
    assert not dispatch.revoke("some-task-id")


def test_redis_broker_keys_carry_the_configured_prefix() -> None:
    # Two deployments on one Redis database: a task sent by one lands only under its prefix,
    # where the other's workers (another prefix) never look.
    import queue
    import random

    import redis

    prefix = f"tailor-prefix-test-{random.randrange(16**8):08x}:"
    url = REDIS_TEST_URL
    client = redis.Redis.from_url(url)
    app = _app(Settings(broker_url=url, broker_key_prefix=prefix))
    try:
        app.send_task(TASK_RUN_STAGE, args=("job_prefix", "prepare"))
        assert client.llen(f"{prefix}cpu") == 1
        other = _app(Settings(broker_url=url, broker_key_prefix=f"{prefix}other:"))
        with other.connection_for_read() as conn:
            assert conn.default_channel.client.llen("cpu") == 0  # the other prefix's queue
            with pytest.raises(queue.Empty):
                conn.SimpleQueue("cpu", no_ack=True).get(timeout=1)
        with app.connection_for_read() as conn:
            message = conn.SimpleQueue("cpu", no_ack=True).get(timeout=5)
            assert message.headers["task"] == TASK_RUN_STAGE
            assert message.headers["argsrepr"] == "('job_prefix', 'prepare')"
    finally:
        flush_redis(url, prefix)  # the other prefix's keys start with this one too
        client.close()


def test_dispatch_publishes_under_the_prefix_in_force_now(monkeypatch: pytest.MonkeyPatch) -> None:
    # A process whose settings change (the test suite, per fixture) must not reuse the app
    # built for another prefix.
    import random

    import redis

    import worker.dispatch as dispatch
    from app.settings import get_settings

    url = REDIS_TEST_URL
    first, second = (f"tailor-dispatch-test-{random.randrange(16**8):08x}-{n}:" for n in (1, 2))
    client = redis.Redis.from_url(url)
    monkeypatch.setenv("TAILOR_BROKER_URL", url)
    try:
        for prefix in (first, second):
            monkeypatch.setenv("TAILOR_BROKER_KEY_PREFIX", prefix)
            get_settings.cache_clear()
            dispatch.send_stage("job_dispatch", "evaluate")
        assert client.llen(f"{first}cpu") == 1 and client.llen(f"{second}cpu") == 1
    finally:
        get_settings.cache_clear()
        for prefix in (first, second):
            flush_redis(url, prefix)
        client.close()


def test_a_broker_outage_while_sending_the_next_stage_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stage that finished but cannot publish the next one must be retried, not failed: what
    # send_stage raises on a dead broker (after its own publish retries) counts as transient.
    import worker.dispatch as dispatch
    from app.settings import get_settings
    from worker.tasks import _is_transient

    monkeypatch.setenv("TAILOR_BROKER_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    try:
        with pytest.raises(Exception) as raised:
            dispatch.send_stage("job_outage", "distill")
    finally:
        get_settings.cache_clear()
    assert not isinstance(raised.value, ConnectionError)  # the builtin check alone misses it
    assert _is_transient(raised.value), type(raised.value)
    assert not _is_transient(ValueError("a bad recipe is not retried"))
