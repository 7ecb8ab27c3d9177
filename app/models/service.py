"""Look up models: base students in the registry, tuned models in the tenant's rows."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import Tenant, TunedModel
from app.deps import Page
from app.errors import NotFound
from app.models.schemas import ModelRead
from ml_core.registry import ModelRegistry, ModelSpec

TUNED_PREFIX = "mdl_"


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
        created_at=model.created_at,
    )


def get_base_spec(registry: ModelRegistry, name: str, role: str = "student") -> ModelSpec:
    """The registry spec of model `name` in `role` (404 for unknown names and other roles)."""
    try:
        spec = registry.get(name)
    except KeyError:
        spec = None
    if spec is None or spec.role != role:
        raise NotFound(f"model {name} not found", resource="model", id=name)
    return spec


def get_tuned(session: Session, tenant: Tenant, model_id: str) -> TunedModel:
    """The tenant's tuned model `model_id` (404 otherwise)."""
    model = session.scalar(
        select(TunedModel).where(TunedModel.id == model_id, TunedModel.tenant_id == tenant.id)
    )
    if model is None:
        raise NotFound(f"model {model_id} not found", resource="model", id=model_id)
    return model


def get_model(
    session: Session, tenant: Tenant, registry: ModelRegistry, model_id: str
) -> ModelRead:
    """A tuned model (by `mdl_` id) or a base student (by name)."""
    if model_id.startswith(TUNED_PREFIX):
        return tuned_read(get_tuned(session, tenant, model_id))
    return base_read(get_base_spec(registry, model_id))


def list_models(
    session: Session, tenant: Tenant, registry: ModelRegistry, page: Page
) -> tuple[list[ModelRead], int]:
    """A page of base students followed by the tenant's tuned models, and their total."""
    base = [base_read(spec) for spec in registry.list("student")]
    mine = TunedModel.tenant_id == tenant.id
    tuned_count = session.scalar(select(func.count()).select_from(TunedModel).where(mine)) or 0
    page_items = base[page.offset : page.offset + page.limit]
    remaining = page.limit - len(page_items)
    if remaining > 0:
        rows = session.scalars(
            select(TunedModel)
            .where(mine)
            .order_by(TunedModel.created_at.desc(), TunedModel.id.desc())
            .offset(max(0, page.offset - len(base)))
            .limit(remaining)
        )
        page_items += [tuned_read(row) for row in rows]
    return page_items, len(base) + tuned_count
