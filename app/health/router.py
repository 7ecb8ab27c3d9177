"""Health routes: /healthz (the process answers) and /readyz (its dependencies answer)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.errors import NotReady, responses
from app.jobs import queue

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 5.0


class Health(BaseModel):
    """The process is up."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Every dependency answered."""

    status: Literal["ready"] = "ready"
    checks: dict[str, str]


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Liveness: answers without touching any dependency."""
    return Health()


def _database(request: Request) -> bool:
    with request.app.state.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return True


def _object_store(request: Request) -> bool:
    store = request.app.state.store
    ping = getattr(store, "ping", None)  # S3: HEAD the bucket with our credentials
    if callable(ping):
        return bool(ping())
    store.exists("readyz/probe")
    return True


async def _run(check: Callable[[], bool]) -> str:
    try:
        ok = await asyncio.wait_for(run_in_threadpool(check), CHECK_TIMEOUT_S)
    except TimeoutError:
        return "timeout"
    except Exception as exc:
        log.warning("readiness check failed: %s", exc)
        return f"error: {type(exc).__name__}"
    return "ok" if ok else "unavailable"


@router.get("/readyz", response_model=Readiness, responses=responses(NotReady))
async def readyz(request: Request) -> Readiness:
    """Readiness: the database, the broker and the object store all answer (503 names which not)."""
    names = ("database", "broker", "object_store")
    results = await asyncio.gather(
        _run(lambda: _database(request)),
        _run(queue.broker_ok),
        _run(lambda: _object_store(request)),
    )
    checks = dict(zip(names, results, strict=True))
    failed = [name for name, result in checks.items() if result != "ok"]
    if failed:
        raise NotReady(f"not ready: {', '.join(failed)}", checks=checks, failed=failed)
    return Readiness(checks=checks)
