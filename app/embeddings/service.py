"""Load students and encode with them: a small LRU of loaded models, tuned models unpacked from
the object store into a local cache folder. Imports torch (through ml_core.student) lazily."""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.db.models import Tenant
from app.errors import Unavailable
from app.models.service import TUNED_PREFIX, get_base_spec, get_tuned
from app.settings import Settings
from app.storage import ObjectStore
from ml_core.registry import SPEC_FILE, ModelRegistry

log = logging.getLogger(__name__)

# Files that mark the root of an exported sentence-transformers folder inside an archive.
FOLDER_MARKERS = (SPEC_FILE, "modules.json", "config.json")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files come from: a registry folder or a tuned model's archive."""

    cache_key: str
    folder: Path | None = None
    archive_key: str | None = None


@dataclass(frozen=True)
class Encoded:
    """Vectors (float32, one row per input) and the tokens they cost."""

    vectors: np.ndarray
    tokens: int


def resolve_source(
    session: Session, tenant: Tenant, registry: ModelRegistry, model: str
) -> ModelSource:
    """The tenant-visible model `model` (404 otherwise)."""
    if model.startswith(TUNED_PREFIX):
        tuned = get_tuned(session, tenant, model)
        return ModelSource(cache_key=tuned.id, archive_key=tuned.object_key)
    spec = get_base_spec(registry, model)
    return ModelSource(cache_key=f"base:{spec.name}", folder=spec.folder)


def _folder_root(folder: Path) -> Path:
    if any((folder / marker).exists() for marker in FOLDER_MARKERS):
        return folder
    children = [child for child in folder.iterdir() if child.is_dir()]
    if len(children) == 1:
        return _folder_root(children[0])
    raise Unavailable("the model archive holds no sentence-transformers folder")


def unpack_tuned(store: ObjectStore, archive_key: str, target: Path) -> Path:
    """Download and unpack a tuned model's .tar.gz into `target` once; returns its model root."""
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
    return _folder_root(target)


def _count_tokens(student: Any, texts: list[str]) -> int:
    tokenizer = getattr(student, "tokenizer", None)
    if callable(tokenizer):
        try:
            encoded = tokenizer(texts, add_special_tokens=True, truncation=True)
            return sum(len(ids) for ids in encoded["input_ids"])
        except Exception:  # usage is informative only
            log.debug("token count failed", exc_info=True)
    return sum(len(text.split()) for text in texts)


class EmbeddingModels:
    """Loaded students, least recently used evicted past `capacity`; safe across threads."""

    def __init__(self, settings: Settings, store: ObjectStore) -> None:
        self.capacity = settings.embed_model_cache_size
        self.cache_dir = Path(settings.embed_cache_dir)
        self.batch_size = settings.embed_batch_size
        self.store = store
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def _get(self, key: str, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        # One thread loads a given model; others asking for it wait for that load.
        with key_lock:
            with self._lock:
                if key in self._loaded:
                    return self._loaded[key]
            student = load()
            with self._lock:
                self._loaded[key] = student
                while len(self._loaded) > self.capacity:
                    evicted, _ = self._loaded.popitem(last=False)
                    log.info("evicted model %s from the embedding cache", evicted)
                self._loading.pop(key, None)
            return student

    def _load(self, source: ModelSource) -> Any:
        from ml_core.student import Student  # torch: only when a model is first needed

        try:
            if source.folder is not None:
                return Student.load(source.folder)
            assert source.archive_key is not None
            folder = unpack_tuned(self.store, source.archive_key, self.cache_dir / source.cache_key)
            return Student.load(folder)
        except Unavailable:
            raise
        except Exception as exc:
            log.exception("could not load model %s", source.cache_key)
            # The cause (logged above) can name object keys and paths: none of it is the client's.
            raise Unavailable(f"model {source.cache_key} could not be loaded; retry later, and "
                              f"quote the request id if it persists") from exc

    def student(self, source: ModelSource) -> Any:
        """The loaded student for `source` (loading it on first use)."""
        return self._get(source.cache_key, lambda: self._load(source))

    def encode(self, source: ModelSource, texts: list[str], input_type: str) -> Encoded:
        """Embed `texts` as queries or passages with the model's prefixes and pooling."""
        student = self.student(source)
        if input_type == "query":
            vectors = student.encode_queries(texts, batch_size=self.batch_size)
        else:
            vectors = student.encode_passages(texts, batch_size=self.batch_size)
        vectors = np.asarray(vectors, dtype=np.float32)
        return Encoded(vectors=vectors, tokens=_count_tokens(student, texts))

    def clear(self) -> None:
        """Forget every loaded model (tests; memory pressure)."""
        with self._lock:
            self._loaded.clear()


def remove_cached(cache_dir: Path, model_id: str) -> None:
    """Delete a tuned model's unpacked folder."""
    shutil.rmtree(Path(cache_dir) / model_id, ignore_errors=True)
