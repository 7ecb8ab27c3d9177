"""Pytest fixtures for the API tests (loaded with `pytest_plugins = ["tests.api_fixtures"]`).

Databases are real: a fresh PostgreSQL database per test session (tailor_test_<random>,
migrated with Alembic, dropped at the end) and a migrated SQLite file. The object store is the
local folder store; the broker is Celery's filesystem transport in a temporary folder, so a
created job stays queued (no worker consumes it here; the worker's tests run jobs).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from app.db.migrate import upgrade
from app.settings import get_settings
from tests.api_support import Api, start_api

PG_ADMIN_URL = os.environ.get(
    "TAILOR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = ("sqlite", "postgresql")


def _pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    """A migrated PostgreSQL database for this test session, dropped afterwards."""
    if not _pg_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}")
    name = f"tailor_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite database file for this test session."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'tailor.db'}"
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def broker_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The filesystem broker folder, exported before worker.dispatch builds its Celery app."""
    folder = tmp_path_factory.mktemp("broker")
    saved = {k: os.environ.get(k) for k in ("TAILOR_BROKER_URL", "TAILOR_BROKER_DIR")}
    os.environ["TAILOR_BROKER_URL"] = "filesystem://"
    os.environ["TAILOR_BROKER_DIR"] = str(folder)
    get_settings.cache_clear()
    yield folder
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    """Each backend in turn (tests that use it run on both)."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def api(tmp_path: Path, database_url: str, model_store: Path, broker_dir: Path) -> Iterator[Api]:
    """The API on each database backend."""
    yield from start_api(tmp_path, database_url, model_store)


@pytest.fixture
def sqlite_api(
    tmp_path: Path, sqlite_url: str, model_store: Path, broker_dir: Path
) -> Iterator[Api]:
    """The API on SQLite only (tests whose behaviour does not depend on the database)."""
    yield from start_api(tmp_path, sqlite_url, model_store)


@pytest.fixture
def pg_api(
    tmp_path: Path, postgresql_url: str, model_store: Path, broker_dir: Path
) -> Iterator[Api]:
    """The API on PostgreSQL only."""
    yield from start_api(tmp_path, postgresql_url, model_store)


@pytest.fixture
def served(sqlite_api: Api) -> Iterator[str]:
    """The same app behind a real uvicorn server on a free port; yields its base URL."""
    import threading
    import time

    import uvicorn

    from tests.processes import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(sqlite_api.app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind, for migration tests."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    name = f"tailor_migration_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}")
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
