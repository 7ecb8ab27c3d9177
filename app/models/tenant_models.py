"""A tenant's own models, tuned by a job or uploaded: one `mdl_` id space, one layout in the
object store (`models/<id>/model.tar.gz` and the folder under `models/<id>/model/`), one local
cache of unpacked folders.

Shared by the API (serving, downloads, job creation) and the worker (a job's base model, bulk
embedding), so it imports only the database layer and the object store.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import TunedModel, UploadedModel
from app.storage import ObjectStore
from ml_core.registry import SPEC_FILE

TENANT_MODEL_PREFIX = "mdl_"
TenantModel = TunedModel | UploadedModel
# Files that mark the root of a sentence-transformers folder inside an archive.
FOLDER_MARKERS = (SPEC_FILE, "modules.json", "config.json")


class ModelFilesMissing(Exception):
    """The stored archive holds no model folder."""


def model_keys(model_id: str) -> tuple[str, str]:
    """The archive's key and the folder's key prefix of tenant model `model_id`."""
    return f"models/{model_id}/model.tar.gz", f"models/{model_id}/model/"


def is_tenant_model(name: str) -> bool:
    """Whether a model name is a tenant model's id rather than a base model's name."""
    return name.startswith(TENANT_MODEL_PREFIX)


def find_tenant_model(session: Session, tenant_id: str, model_id: str) -> TenantModel | None:
    """The tenant's model `model_id`, tuned or uploaded (None for anyone else's)."""
    for table in (TunedModel, UploadedModel):
        row = session.scalar(
            select(table).where(table.id == model_id, table.tenant_id == tenant_id)
        )
        if row is not None:
            return row
    return None


def folder_root(folder: Path) -> Path:
    """The model's root inside an unpacked archive (the folder or its one subfolder)."""
    if any((folder / marker).exists() for marker in FOLDER_MARKERS):
        return folder
    children = [child for child in folder.iterdir() if child.is_dir()]
    if len(children) == 1:
        return folder_root(children[0])
    raise ModelFilesMissing("the model archive holds no sentence-transformers folder")


def unpack_stored_model(store: ObjectStore, archive_key: str, target: Path) -> Path:
    """Download and unpack a stored model archive into `target` once (a later call, in any
    process on this host, reuses it); returns the model's root folder."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".unpack-", dir=target.parent) as tmp:
            archive = store.get_file(archive_key, Path(tmp) / "model.tar.gz")
            staging = Path(tmp) / "model"
            with tarfile.open(archive, "r:gz") as tar:
                # The "data" filter refuses absolute paths, links out of the folder and devices.
                tar.extractall(staging, filter="data")
            try:
                staging.rename(target)
            except OSError:
                if not target.exists():  # another process may have unpacked it first
                    raise
    return folder_root(target)


def cached_model_folder(store: ObjectStore, cache_dir: Path, model: TenantModel) -> Path:
    """The unpacked folder of a tenant model in the local cache `cache_dir/<id>`."""
    return unpack_stored_model(store, model.object_key, Path(cache_dir) / model.id)
