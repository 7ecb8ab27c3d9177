"""Request dependencies, defined once and reused: settings, session, tenant, store, paging."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth import authorize, authorize_cached
from app.db.models import Tenant
from app.db.session import transaction
from app.settings import Settings
from app.storage import ObjectStore
from ml_core.registry import ModelRegistry

# Dependencies that only read the app's state are `async def`: FastAPI runs a plain `def`
# dependency on a worker thread, a thread hop per dependency per request.


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(_settings)]


def _session(request: Request) -> Iterator[Session]:
    # The request's one transaction: services only flush; it commits when the handler returns
    # (before the response is sent, scope="function") and rolls back when it raises. Uploads
    # commit their own rows (app.storage.stored_until_committed) to clean up after a failure.
    with transaction(request.app.state.session_factory) as session:
        yield session


SessionDep = Annotated[Session, Depends(_session, scope="function")]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer tlr_...` (the first with `tailor create-tenant NAME`, "
    "more with POST /v1/api-keys). A key of scope `embed` may call the embedding and rerank "
    "routes only.",
)


def _current_tenant(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    return authorize(request, session, credentials.credentials if credentials else None)


CurrentTenant = Annotated[Tenant, Depends(_current_tenant)]


async def serving_tenant(request: Request, key: str | None) -> Tenant:
    """The serving routes' caller: a key verified a moment ago is answered on the event loop,
    without a session or a thread; otherwise the full check runs on a worker thread in its own
    transaction. The tenant is detached (its columns loaded): these routes open a session only
    to look a tenant model up (app.embeddings.router.source_for)."""
    tenant = authorize_cached(request, key)
    if tenant is not None:
        return tenant

    def check() -> Tenant:
        with transaction(request.app.state.session_factory) as session:
            return authorize(request, session, key)

    return await run_in_threadpool(check)


def bearer_key(request: Request) -> str | None:
    """The API key of `Authorization: Bearer <key>`, None without one (what `_bearer` gives)."""
    scheme, key = get_authorization_scheme_param(request.headers.get("Authorization"))
    return key if key and scheme.lower() == "bearer" else None


async def _serving_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    return await serving_tenant(request, credentials.credentials if credentials else None)


ServingTenant = Annotated[Tenant, Depends(_serving_tenant)]


async def _store(request: Request) -> ObjectStore:
    return request.app.state.store


StoreDep = Annotated[ObjectStore, Depends(_store)]


@functools.lru_cache(maxsize=8)
def registry_at(store: Path) -> ModelRegistry:
    """The model registry of `store`, one per store: it holds no state but the folder, and the
    serving routes ask for it on every request."""
    return ModelRegistry(store)


async def _registry(settings: SettingsDep) -> ModelRegistry:
    return registry_at(settings.model_store)


RegistryDep = Annotated[ModelRegistry, Depends(_registry)]


@dataclass(frozen=True)
class Page:
    """Offset pagination parameters."""

    offset: int
    limit: int


# The largest offset a list accepts: far past any real collection, and within every
# database's OFFSET (a 64-bit integer).
MAX_OFFSET = 2**31 - 1


def _page(
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=100, description="Items to return.")] = 20,
) -> Page:
    return Page(offset=offset, limit=limit)


PageDep = Annotated[Page, Depends(_page)]
