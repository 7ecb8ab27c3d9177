"""Helpers for the API tests: a running app with its client, tenants, and test files.

The fixtures live in tests/api_fixtures.py (a pytest plugin the API test modules load).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.main import create_app
from app.settings import Settings, get_settings
from app.tenants.service import create_tenant


@dataclass
class Api:
    """A running app, its HTTP client and its settings."""

    app: FastAPI
    client: TestClient
    settings: Settings

    def session(self) -> Session:
        """A database session on the app's engine."""
        return self.app.state.session_factory()

    def tenant(self, name: str = "acme") -> Caller:
        """A new tenant with an API key."""
        with self.session() as session:
            tenant, key = create_tenant(session, f"{name}-{uuid.uuid4().hex[:6]}")
            session.commit()
        return Caller(self, tenant.id, key)

    @property
    def objects(self) -> Path:
        """The local object store's root folder."""
        return Path(self.settings.object_store_url.removeprefix("file://"))

    def stored(self) -> list[str]:
        """Every object key in the store."""
        return self.app.state.store.list("")


@dataclass
class Caller:
    """A tenant's view of the API: its requests carry its key."""

    api: Api
    tenant_id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.api.client.get(url, headers=self.headers, **kwargs)

    def post(self, url: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        return self.api.client.post(url, headers={**self.headers, **(headers or {})}, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> Any:
        return self.api.client.delete(url, headers=self.headers, **kwargs)

    def upload_corpus(self, data: bytes, filename: str = "corpus.jsonl", **form: str) -> Any:
        return self.post("/v1/corpora", files={"file": (filename, data)}, data=form)

    def corpus(self, documents: int = 5) -> dict[str, Any]:
        """Upload a valid corpus; returns it."""
        response = self.upload_corpus(corpus_bytes(documents))
        assert response.status_code == 201, response.text
        return response.json()

    def job(self, corpus_id: str, **fields: Any) -> dict[str, Any]:
        """Create a valid job; returns it."""
        response = self.post("/v1/jobs", json=job_body(corpus_id, **fields))
        assert response.status_code == 201, response.text
        return response.json()


def make_settings(tmp_path: Path, database_url: str, model_store: Path, **extra: Any) -> Settings:
    """Settings for one test: its own object store, the session's database and models."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "object_store_url": f"file://{tmp_path / 'objects'}",
        "broker_url": os.environ.get("TAILOR_BROKER_URL", "filesystem://"),
        "broker_dir": os.environ.get("TAILOR_BROKER_DIR", str(tmp_path / "broker")),
        "model_store": model_store,
        "work_dir": tmp_path / "work",
        "upload_dir": tmp_path / "uploads",
        "embed_cache_dir": tmp_path / "embed-cache",
    }
    values.update(extra)
    return Settings(**values)


def start_api(tmp_path: Path, database_url: str, model_store: Path, **extra: Any) -> Iterator[Api]:
    """Create the app for these settings and serve it through a TestClient (lifespan run)."""
    settings = make_settings(tmp_path, database_url, model_store, **extra)
    # worker.dispatch records task ids through the process-wide settings: same database.
    saved = os.environ.get("TAILOR_DATABASE_URL")
    os.environ["TAILOR_DATABASE_URL"] = database_url
    get_settings.cache_clear()
    app = create_app(settings)
    try:
        with TestClient(app) as client:
            yield Api(app=app, client=client, settings=settings)
    finally:
        if saved is None:
            os.environ.pop("TAILOR_DATABASE_URL", None)
        else:
            os.environ["TAILOR_DATABASE_URL"] = saved
        get_settings.cache_clear()


@contextmanager
def rows_refused(api: Api, table: str) -> Iterator[None]:
    """Inside the block the database refuses every new row of `table` (a real trigger)."""
    refuse = {
        "postgresql": [
            "CREATE FUNCTION refuse_rows() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'rows refused'; END $$",
            f"CREATE TRIGGER refuse_rows BEFORE INSERT ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION refuse_rows()",
        ],
        "sqlite": [
            f"CREATE TRIGGER refuse_rows BEFORE INSERT ON {table} "
            "BEGIN SELECT RAISE(ABORT, 'rows refused'); END",
        ],
    }
    allow = {
        "postgresql": [f"DROP TRIGGER refuse_rows ON {table}", "DROP FUNCTION refuse_rows()"],
        "sqlite": ["DROP TRIGGER refuse_rows"],
    }

    def execute(statements: dict[str, list[str]]) -> None:
        with api.session() as session:
            for statement in statements[session.get_bind().dialect.name]:
                session.execute(text(statement))
            session.commit()

    execute(refuse)
    try:
        yield
    finally:
        execute(allow)


# ---------------------------------------------------------------------------------------------
# Test data


def corpus_bytes(documents: int = 5, *, compress: bool = False) -> bytes:
    """A valid BEIR corpus of `documents` lines (ids d0, d1, ...)."""
    lines = [
        json.dumps({"_id": f"d{i}", "title": f"Title {i}",
                    "text": f"passage number {i} about wind tunnels and boundary layers"})
        for i in range(documents)
    ]
    data = ("\n".join(lines) + "\n").encode()
    return gzip.compress(data) if compress else data


def queries_bytes(ids: list[str]) -> bytes:
    """BEIR queries for these ids."""
    return "".join(json.dumps({"_id": q, "text": f"question {q}?"}) + "\n" for q in ids).encode()


def qrels_bytes(pairs: list[tuple[str, str, int]], header: bool = True) -> bytes:
    """A BEIR qrels TSV."""
    out = io.StringIO()
    if header:
        out.write("query-id\tcorpus-id\tscore\n")
    for query_id, doc_id, score in pairs:
        out.write(f"{query_id}\t{doc_id}\t{score}\n")
    return out.getvalue().encode()


TINY_MODELS = {
    "base_model": "tiny-student",
    "teacher": "tiny-teacher",
    "generator": "tiny-generator",
}


def job_body(corpus_id: str, **fields: Any) -> dict[str, Any]:
    """A valid job request on the tiny models."""
    return {"corpus_id": corpus_id, **TINY_MODELS, "preset": "quick", **fields}
