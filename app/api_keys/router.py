"""API key routes: create, list, read, revoke."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, status

from app.api_keys.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyList, ApiKeyRead
from app.db.base import utcnow
from app.db.models import ApiKey
from app.db.tenant_rows import newest_first, owned
from app.deps import CurrentTenant, PageDep, SessionDep
from app.errors import InsufficientScope, InvalidRequest, NotFound, Unauthorized, responses
from app.tenants import service

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"])

ERRORS = (Unauthorized, InsufficientScope, InvalidRequest)


@router.post(
    "",
    response_model=ApiKeyCreated,
    status_code=status.HTTP_201_CREATED,
    responses=responses(*ERRORS),
)
def create_api_key(body: ApiKeyCreate, session: SessionDep, tenant: CurrentTenant) -> ApiKeyCreated:
    """Create a key for this tenant. The response holds the secret, which is not shown again
    (only its hash is stored). Needs a `train` key."""
    expires_at = (
        utcnow() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    )
    row, secret = service.create_api_key(
        session, tenant, name=body.name, scope=body.scope, expires_at=expires_at
    )
    return ApiKeyCreated.model_validate({**ApiKeyRead.model_validate(row).model_dump(),
                                         "key": secret})


@router.get("", response_model=ApiKeyList, responses=responses(*ERRORS))
def list_api_keys(session: SessionDep, tenant: CurrentTenant, page: PageDep) -> ApiKeyList:
    """List this tenant's keys, newest first, revoked and expired ones included (no secrets)."""
    rows, count = newest_first(session, ApiKey, page, ApiKey.tenant_id == tenant.id)
    return ApiKeyList(data=[ApiKeyRead.model_validate(row) for row in rows], count=count)


@router.get("/{key_id}", response_model=ApiKeyRead, responses=responses(*ERRORS, NotFound))
def get_api_key(key_id: str, session: SessionDep, tenant: CurrentTenant) -> ApiKey:
    """Read one key (no secret)."""
    return owned(session, ApiKey, tenant.id, key_id, "api_key")


@router.delete(
    "/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=responses(*ERRORS, NotFound),
)
def revoke_api_key(key_id: str, session: SessionDep, tenant: CurrentTenant) -> None:
    """Revoke a key: it stops working at once on this API process, and on every other within
    the key cache's lifetime (`TAILOR_API_KEY_CACHE_TTL_S`, 10 s by default). Revoking a
    revoked key changes nothing."""
    owned(session, ApiKey, tenant.id, key_id, "api_key")
    service.revoke_api_key(session, key_id, tenant.id)
