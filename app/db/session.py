"""Engines and sessions: one engine per database URL, sessions that commit once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings, get_settings


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    # Foreign keys are off by default in SQLite; WAL lets the API read while a worker writes;
    # busy_timeout waits for the writer's lock instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_locking_reads(
    conn: Connection, clause: Any, multiparams: Any, params: Any, options: Any
) -> None:
    # SQLite renders no FOR UPDATE, and a transaction takes the write lock only at its first
    # write: a read-decide-write (the worker claiming a job, a corpus deleted while a job is
    # created) could overwrite what another writer committed in between. A locking read opens
    # an IMMEDIATE transaction instead, holding the database-wide write lock until commit.
    if getattr(clause, "_for_update_arg", None) is None:
        return
    dbapi_connection = conn.connection.dbapi_connection
    if dbapi_connection is not None and not dbapi_connection.in_transaction:
        dbapi_connection.execute("BEGIN IMMEDIATE")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url` (sqlite:///path or postgresql://...); SQLite tuned for sharing."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, "timeout": 30}
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "before_execute", _sqlite_locking_reads)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # psycopg 3 is the driver we ship; a bare postgresql:// URL would ask for psycopg2.
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return create_engine(url, pool_pre_ping=True, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to `engine` that keep loaded attributes usable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    return make_engine(url)


def get_engine(settings: Settings | None = None) -> Engine:
    """The process-wide engine for the settings' database URL."""
    return _engine_for((settings or get_settings()).database_url)


def get_session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    """A session factory on the process-wide engine."""
    return make_session_factory(get_engine(settings))


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session from `factory` that commits when the block succeeds and rolls back when it
    raises (the request's unit of work in the API, a task's in the worker)."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A transaction on the process-wide engine."""
    with transaction(get_session_factory(settings)) as session:
        yield session
