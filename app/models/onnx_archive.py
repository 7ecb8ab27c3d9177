"""A tuned model's download with an ONNX export inside, built on first request and kept.

The worker archives the sentence-transformers folder; customers who serve with onnxruntime (or
sentence-transformers' ONNX backend) ask for `?onnx=true`. The first such request unpacks the
archive, exports the encoder (`ml_core.export.export_onnx`, which checks its vectors against
PyTorch), packs the folder again with `onnx/model.onnx` added and stores it beside the original;
later requests get the stored archive.
"""

from __future__ import annotations

import tarfile
import tempfile
import threading
from pathlib import Path

from app.db.models import TunedModel
from app.embeddings.service import unpack_tuned
from app.errors import Unavailable
from app.storage import ObjectStore

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def onnx_archive_key(model: TunedModel) -> str:
    """Where the ONNX archive of `model` is kept: beside its archive."""
    return model.object_key.removesuffix(".tar.gz") + "-onnx.tar.gz"


def ensure_onnx_archive(store: ObjectStore, model: TunedModel, work_dir: Path) -> str:
    """The object key of `model`'s archive with `onnx/model.onnx`, building it when absent."""
    key = onnx_archive_key(model)
    with _locks_guard:
        lock = _locks.setdefault(model.id, threading.Lock())
    with lock:  # one export per model in this process; others wait for it
        if store.exists(key):
            return key
        from ml_core.export import export_onnx  # torch: only when an export is asked for

        work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".onnx-", dir=work_dir) as tmp:
            root = unpack_tuned(store, model.object_key, Path(tmp) / "model")
            try:
                export_onnx(root)
            except Exception as exc:
                raise Unavailable(f"model {model.id} could not be exported to ONNX: {exc}") \
                    from exc
            archive = Path(tmp) / "model-onnx.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                tar.add(root, arcname=root.name)
            store.put_file(key, archive)
    return key
