"""A tenant's own base model, uploaded as a sentence-transformers folder in a .tar.gz.

The archive is unpacked and proven to be a usable student by ml_core.model_archive (safe
members, safetensors only, config, tokenizer and pooling read, a test encode); only then is it
stored, exactly like a tuned model: the folder with its tailor-model.json under
`models/<id>/model/` and a normalised archive (one top-level folder named after the id) at
`models/<id>/model.tar.gz`, which the API and the workers unpack into their local caches.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from app.db.models import Tenant, UploadedModel
from app.errors import InvalidModel, PayloadTooLarge
from app.ids import new_id
from app.models.tenant_models import model_keys
from app.settings import Settings
from app.storage import ObjectStore, copy_tree_to_store, stored_until_committed
from app.uploads import SpooledFile, file_upload_body

MODEL_UPLOAD_BODY = file_upload_body(
    "A sentence-transformers folder as .tar.gz (the folder itself or its files at the top): "
    "modules.json, a Transformer with config.json, safetensors weights and its tokenizer, "
    "1_Pooling (mean or CLS), optionally 2_Normalize and prompts."
)


def create_uploaded_model(
    session: Session, store: ObjectStore, tenant: Tenant, upload: SpooledFile, name: str,
    settings: Settings,
) -> UploadedModel:
    """Validate the spooled archive (422 naming the file, 413 past the unpacked limit), then
    store the model and record it (committed here: a row that cannot be written leaves no
    files behind)."""
    from ml_core.model_archive import (
        InvalidModelArchive,
        ModelArchiveTooLarge,
        accept_student_folder,
        unpack_model_archive,
    )
    from ml_core.registry import file_sha256

    model_id = new_id("mdl")
    archive_key, folder_key = model_keys(model_id)
    work = Path(settings.upload_dir) if settings.upload_dir else None
    with tempfile.TemporaryDirectory(prefix="tailor-model-", dir=work) as tmp:
        if not upload.gzipped:
            raise InvalidModel(f"{upload.filename}: not a .tar.gz archive (no gzip data)",
                               file=upload.filename)
        try:
            root = unpack_model_archive(upload.path, Path(tmp) / "model",
                                        max_bytes=settings.model_unpacked_max_bytes,
                                        max_files=settings.model_upload_max_files,
                                        name=upload.filename)
            spec = accept_student_folder(root, model_id, source=f"uploaded as {upload.filename}")
        except InvalidModelArchive as exc:
            # "model.tar.gz: my-model/pytorch_model.bin: pickled weights are refused ..."
            detail = str(exc) if exc.file == upload.filename else f"{upload.filename}: {exc}"
            error = PayloadTooLarge if isinstance(exc, ModelArchiveTooLarge) else InvalidModel
            raise error(detail, file=exc.file) from None
        archive = Path(tmp) / "model.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(root, arcname=model_id)
        model = UploadedModel(
            id=model_id, tenant_id=tenant.id, name=name or upload.default_name,
            filename=upload.filename, object_key=archive_key, folder_key=folder_key,
            size_bytes=upload.size, sha256=file_sha256(upload.path), dim=int(spec.dim or 0),
            spec=spec.model_dump(mode="json"),
        )
        with stored_until_committed(session, store, f"models/{model_id}/"):
            copy_tree_to_store(store, root, folder_key)
            store.put_file(archive_key, archive)
            session.add(model)
    return model
