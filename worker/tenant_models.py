"""A job's models as a worker finds them: base models in the model store, a tenant's own
(tuned or uploaded, `mdl_...`) fetched from the object store into the local cache once and
known to the registry by their id."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from app.db.session import session_scope
from app.models.tenant_models import cached_model_folder, find_tenant_model, is_tenant_model
from app.settings import Settings
from app.storage import ObjectStore
from ml_core.registry import ModelRegistry, UnknownModel


def job_registry(
    settings: Settings, store: ObjectStore, tenant_id: str, names: Iterable[str]
) -> ModelRegistry:
    """The model store plus the tenant's models among `names`; UnknownModel (the job's error
    code unknown_model) for a tenant model that is gone."""
    extra: dict[str, Path] = {}
    for name in names:
        if not is_tenant_model(name) or name in extra:
            continue
        with session_scope() as session:
            model = find_tenant_model(session, tenant_id, name)
        if model is None:
            raise UnknownModel(f"model {name} no longer exists")
        extra[name] = cached_model_folder(store, Path(settings.embed_cache_dir), model)
    return ModelRegistry(Path(settings.model_store), extra)
