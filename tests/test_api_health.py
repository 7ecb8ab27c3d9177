"""Health probes, the CLI, and the schema that Alembic builds."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import app.db.models  # noqa: F401  (tables on Base.metadata)
from app.db.base import Base
from app.db.session import make_engine
from tests.api_support import Api, start_api

pytest_plugins = ["tests.api_fixtures"]

REPO = Path(__file__).resolve().parents[1]


def test_healthz_needs_nothing(sqlite_api: Api) -> None:
    assert sqlite_api.client.get("/healthz").json() == {"status": "ok"}


def test_readyz_checks_every_dependency(api: Api) -> None:
    response = api.client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok", "object_store": "ok"},
    }


@pytest.fixture
def no_database_api(tmp_path: Path, model_store: Path, broker_dir: Path) -> Iterator[Api]:
    """The API pointed at a PostgreSQL database that does not exist."""
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/tailor_no_such_database"
    yield from start_api(tmp_path, url, model_store)


def test_readyz_names_the_failed_check(no_database_api: Api) -> None:
    response = no_database_api.client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["error"] == "not_ready"
    assert body["failed"] == ["database"]
    assert body["checks"]["broker"] == body["checks"]["object_store"] == "ok"
    assert no_database_api.client.get("/healthz").status_code == 200


def test_migrations_build_exactly_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=120, check=False,
    )


def test_cli_migrates_and_creates_a_tenant_whose_key_works(
    tmp_path: Path, model_store: Path, broker_dir: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "TAILOR_DATABASE_URL": url}
    assert _cli("migrate", env=env).returncode == 0
    created = _cli("create-tenant", "Acme Aero", env=env)
    assert created.returncode == 0, created.stderr
    fields = dict(line.split(":", 1) for line in created.stdout.splitlines())
    tenant_id, key = fields["tenant_id"].strip(), fields["api_key"].strip()
    assert tenant_id.startswith("ten_") and key.startswith("tlr_") and len(key) == 44
    assert "shown only once" in created.stderr
    for api in start_api(tmp_path, url, model_store):
        headers = {"Authorization": f"Bearer {key}"}
        assert api.client.get("/v1/corpora", headers=headers).status_code == 200
        # The key itself is not stored, only its hash.
        assert key.encode() not in (tmp_path / "cli.db").read_bytes()
    second = _cli("create-key", tenant_id, env=env)
    assert second.returncode == 0 and "tlr_" in second.stdout
    assert _cli("create-key", "ten_missing", env=env).returncode == 1
