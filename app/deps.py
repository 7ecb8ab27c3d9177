"""Request dependencies, defined once and reused: settings, session, tenant, store, paging."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.db.models import Tenant
from app.db.session import transaction
from app.errors import Unauthorized
from app.settings import Settings
from app.storage import ObjectStore
from app.tenants.service import authenticate
from ml_core.registry import ModelRegistry


def _settings(request: Request) -> Settings:
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
    description="`Authorization: Bearer tlr_...` (create one with `tailor create-tenant NAME`).",
)


def _current_tenant(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    if credentials is None:
        raise Unauthorized("missing bearer API key")
    tenant = authenticate(session, credentials.credentials)
    if tenant is None:
        raise Unauthorized("invalid or revoked API key")
    return tenant


CurrentTenant = Annotated[Tenant, Depends(_current_tenant)]


def _store(request: Request) -> ObjectStore:
    return request.app.state.store


StoreDep = Annotated[ObjectStore, Depends(_store)]


def _registry(settings: SettingsDep) -> ModelRegistry:
    return ModelRegistry(settings.model_store)


RegistryDep = Annotated[ModelRegistry, Depends(_registry)]


@dataclass(frozen=True)
class Page:
    """Offset pagination parameters."""

    offset: int
    limit: int


def _page(
    offset: Annotated[int, Query(ge=0, description="Items to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=100, description="Items to return.")] = 20,
) -> Page:
    return Page(offset=offset, limit=limit)


PageDep = Annotated[Page, Depends(_page)]
