"""Look up models: base students in the registry, a tenant's own (tuned or uploaded) models in
its rows; rename and delete the tenant's own."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import Tenant, TunedModel, UploadedModel
from app.dependants import active_jobs_using, refuse_if_used
from app.deps import Page
from app.errors import InvalidRequest, NotFound
from app.metadata import matches
from app.models.schemas import ModelRead, ModelUpdate
from app.models.tenant_models import (
    TENANT_MODEL_PREFIX,
    TenantModel,
    find_tenant_model,
    is_tenant_model,
)
from ml_core.registry import ModelRegistry, ModelSpec

TUNED_PREFIX = TENANT_MODEL_PREFIX


def base_read(spec: ModelSpec) -> ModelRead:
    """The API view of a base student."""
    return ModelRead(
        id=spec.name, kind="base", name=spec.name, base_model=None, dim=spec.dim,
        licence=spec.licence or None,
    )


def tuned_read(model: TunedModel) -> ModelRead:
    """The API view of a tuned model."""
    return ModelRead(
        id=model.id, kind="tuned", name=model.name, base_model=model.base_model, dim=model.dim,
        job_id=model.job_id, metrics=model.metrics, recommended=model.recommended,
        metadata=model.metadata_ or {}, created_at=model.created_at,
    )


def uploaded_read(model: UploadedModel) -> ModelRead:
    """The API view of a model the tenant uploaded."""
    return ModelRead(
        id=model.id, kind="uploaded", name=model.name, base_model=None, dim=model.dim,
        metadata=model.metadata_ or {}, created_at=model.created_at,
    )


def tenant_read(model: TenantModel) -> ModelRead:
    """The API view of a tenant's own model, tuned or uploaded."""
    return tuned_read(model) if isinstance(model, TunedModel) else uploaded_read(model)


def get_base_spec(registry: ModelRegistry, name: str, role: str = "student") -> ModelSpec:
    """The registry spec of model `name` in `role` (404 for unknown names and other roles)."""
    try:
        spec = registry.get(name)
    except KeyError:
        spec = None
    if spec is None or spec.role != role:
        raise NotFound(f"model {name} not found", resource="model", id=name)
    return spec


def get_tenant_model(session: Session, tenant: Tenant, model_id: str) -> TenantModel:
    """The tenant's model `model_id`, tuned or uploaded (404 otherwise)."""
    model = find_tenant_model(session, tenant.id, model_id)
    if model is None:
        raise NotFound(f"model {model_id} not found", resource="model", id=model_id)
    return model


def get_model(
    session: Session, tenant: Tenant, registry: ModelRegistry, model_id: str
) -> ModelRead:
    """A tenant model (by `mdl_` id) or a base student (by name)."""
    if is_tenant_model(model_id):
        return tenant_read(get_tenant_model(session, tenant, model_id))
    return base_read(get_base_spec(registry, model_id))


def update_model(model: TenantModel, update: ModelUpdate) -> TenantModel:
    """Rename one of the tenant's models or replace its metadata (the fields the request
    sets)."""
    if "name" in update.model_fields_set:
        if update.name is None:
            raise InvalidRequest("a model's name cannot be cleared", field="name")
        model.name = update.name
    if "metadata" in update.model_fields_set:
        model.metadata_ = dict(update.metadata or {})
    return model


def delete_model(session: Session, tenant: Tenant, model: TenantModel) -> None:
    """Delete one of the tenant's models (its row; the caller removes its objects and cached
    copies after the commit). 409 naming the jobs not yet finished that use it."""
    refuse_if_used("model", model.id, active_jobs_using(session, tenant.id, model_id=model.id))
    session.delete(model)
    session.flush()


def list_models(
    session: Session, tenant: Tenant, registry: ModelRegistry, page: Page,
    name: str | None = None, metadata: dict[str, str] | None = None,
) -> tuple[list[ModelRead], int]:
    """A page of base students followed by the tenant's own models (tuned and uploaded, newest
    first), and their total. `name` and `metadata` filter them (base models have no
    metadata: a metadata filter lists only the tenant's own)."""
    base = [base_read(spec) for spec in registry.list("student")
            if not metadata and name in (None, spec.name)]
    page_items = base[page.offset : page.offset + page.limit]
    # The tenant's models of both tables as one newest-first list: each table's newest rows up
    # to the end of the page are enough to cut the page from their merge.
    skip = max(0, page.offset - len(base))
    remaining = page.limit - len(page_items)
    own: list[TenantModel] = []
    total = len(base)
    for table in (TunedModel, UploadedModel):
        mine = [table.tenant_id == tenant.id, *matches(table.metadata_, metadata or {})]
        if name is not None:
            mine.append(table.name == name)
        total += session.scalar(select(func.count()).select_from(table).where(*mine)) or 0
        if remaining > 0:
            own += session.scalars(
                select(table).where(*mine)
                .order_by(table.created_at.desc(), table.id.desc()).limit(skip + remaining)
            )
    own.sort(key=lambda row: (row.created_at, row.id), reverse=True)
    page_items += [tenant_read(row) for row in own[skip : skip + max(0, remaining)]]
    return page_items, total
