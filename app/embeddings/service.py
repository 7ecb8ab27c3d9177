"""Load students and encode with them: a small LRU of loaded models, tuned models unpacked from
the object store into a local cache folder. Imports torch (through ml_core.student) lazily."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.db.models import Tenant
from app.embeddings.batching import Batcher, Overloaded
from app.errors import Unavailable
from app.metrics import MODEL_CACHE
from app.models.service import get_base_spec, get_tenant_model
from app.models.tenant_models import ModelFilesMissing, is_tenant_model, unpack_stored_model
from app.settings import Settings
from app.storage import ObjectStore
from ml_core.registry import SPEC_FILE, ModelRegistry, ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files come from: a registry folder or a tenant model's archive."""

    cache_key: str
    folder: Path | None = None
    archive_key: str | None = None


def resolve_source(
    session: Session, tenant: Tenant, registry: ModelRegistry, model: str
) -> ModelSource:
    """The tenant-visible model `model`: a base model by name, the tenant's tuned or uploaded
    model by `mdl_` id (404 otherwise)."""
    if is_tenant_model(model):
        own = get_tenant_model(session, tenant, model)
        return ModelSource(cache_key=own.id, archive_key=own.object_key)
    return base_source(registry, model)


def base_source(registry: ModelRegistry, model: str) -> ModelSource:
    """The base model `model` of the store (404 naming the known ones otherwise)."""
    spec = _base_spec(registry, model)
    return ModelSource(cache_key=f"base:{spec.name}", folder=spec.folder)


# Base specs read from the store, by (store, name): (the spec file's mtime, when it was last
# checked, the spec). Reading and validating the JSON on every request cost more than the rest of
# a request's lookup, and so did a stat of the file under load: it is checked again once a second.
# A name has many spellings ("./x", "x/"): past BASE_SPECS_KEPT entries the cache starts over.
_BASE_SPECS: dict[tuple[Path, str], tuple[int, float, ModelSpec]] = {}
SPEC_RECHECK_S = 1.0
BASE_SPECS_KEPT = 1024


def _base_spec(registry: ModelRegistry, name: str) -> ModelSpec:
    key = (registry.store, name)
    now = time.monotonic()
    cached = _BASE_SPECS.get(key)
    if cached is not None and now - cached[1] < SPEC_RECHECK_S:
        return cached[2]
    try:
        mtime = (registry.store / name / SPEC_FILE).stat().st_mtime_ns
    except OSError:
        mtime = -1
    if cached is not None and cached[0] == mtime:
        _BASE_SPECS[key] = (mtime, now, cached[2])
        return cached[2]
    spec = get_base_spec(registry, name)
    if len(_BASE_SPECS) >= BASE_SPECS_KEPT:
        _BASE_SPECS.clear()
    _BASE_SPECS[key] = (mtime, now, spec)
    return spec


def unpack_tuned(store: ObjectStore, archive_key: str, target: Path) -> Path:
    """Download and unpack a tenant model's .tar.gz into `target` once; returns its model root
    (503 when the archive holds no model folder)."""
    try:
        return unpack_stored_model(store, archive_key, target)
    except ModelFilesMissing as exc:
        raise Unavailable(str(exc)) from exc


@dataclass(frozen=True)
class Tokenized:
    """Inputs tokenized as the model encodes them: ids, and which inputs were cut."""

    ids: list[list[int]]
    truncated: list[int]  # indices of the inputs longer than the model's limit

    @property
    def tokens(self) -> int:
        return sum(len(row) for row in self.ids)


class ServedStudent:
    """A loaded student and its private serving tokenizer (tokenize once, encode the ids)."""

    def __init__(self, student: Any) -> None:
        self.student = student
        self.tokenizer = student.serving_tokenizer()
        self.max_tokens = int(student.max_seq_length)

    def tokenize(self, texts: list[str], input_type: str) -> Tokenized:
        """Ids with the kind's prefix and special tokens, cut at the model's length."""
        encodings = self.tokenizer.encode_batch(self.student.encoding_texts(texts, input_type))
        return Tokenized(ids=[e.ids for e in encodings],
                         truncated=[i for i, e in enumerate(encodings) if e.overflowing])

    def encode_ids(self, ids: list[list[int]]) -> np.ndarray:
        """One batch of token ids to float32 vectors (runs on an encoder thread)."""
        return self.student.encode_token_ids(ids)


def default_batch_tokens() -> int:
    """The token budget of a micro-batch when the settings leave it to the hardware: 8,192 on a
    CPU (32 passages of 256 tokens, or hundreds of short queries), 65,536 on a GPU."""
    import torch

    return 65_536 if torch.cuda.is_available() else 8_192


def default_encoders() -> int:
    """Encoder threads when the settings leave it to the hardware: one on a GPU; on a CPU one
    per core (up to 4), each with its share of the cores as torch threads. On 2 cores, two
    encoders of one torch thread each served single queries faster than one encoder of two
    threads, whose threads wait for each other whenever the event loop takes a core."""
    import torch

    from ml_core.student import limit_threads

    if torch.cuda.is_available():
        return 1
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    encoders = max(1, min(cores, 4))
    limit_threads(cores // encoders)
    return encoders


class EmbeddingModels:
    """Loaded students, least recently used evicted past `capacity`; safe across threads.

    `embed` batches the inputs of concurrent requests per model (app.embeddings.batching).
    """

    def __init__(self, settings: Settings, store: ObjectStore) -> None:
        self.capacity = settings.embed_model_cache_size
        self.cache_dir = Path(settings.embed_cache_dir)
        self.settings = settings
        self.store = store
        self._loaded: OrderedDict[str, ServedStudent] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._batcher: Batcher | None = None

    @property
    def batcher(self) -> Batcher:
        """The micro-batcher shared by every loaded model (created with the first model)."""
        with self._lock:
            if self._batcher is None:
                settings = self.settings
                self._batcher = Batcher(
                    token_budget=settings.embed_batch_tokens or default_batch_tokens(),
                    max_wait_s=settings.embed_batch_wait_ms / 1000,
                    encoders=settings.embed_encoders or default_encoders(),
                    max_queued_rows=settings.embed_max_queued_inputs,
                    name="embed-encoder",
                )
            return self._batcher

    def _get(self, key: str, load: Callable[[], ServedStudent]) -> ServedStudent:
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                MODEL_CACHE.labels("hit").inc()
                return self._loaded[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        # One thread loads a given model; others asking for it wait for that load.
        with key_lock:
            with self._lock:
                if key in self._loaded:
                    MODEL_CACHE.labels("hit").inc()
                    return self._loaded[key]
            MODEL_CACHE.labels("miss").inc()
            served = load()
            with self._lock:
                self._loaded[key] = served
                while len(self._loaded) > self.capacity:
                    evicted, _ = self._loaded.popitem(last=False)
                    log.info("evicted model %s from the embedding cache", evicted)
                self._loading.pop(key, None)
            return served

    def _load(self, source: ModelSource) -> ServedStudent:
        from ml_core.student import Student  # torch: only when a model is first needed

        try:
            if source.folder is not None:
                return ServedStudent(Student.load(source.folder))
            assert source.archive_key is not None
            folder = unpack_tuned(self.store, source.archive_key, self.cache_dir / source.cache_key)
            return ServedStudent(Student.load(folder))
        except Unavailable:
            raise
        except Exception as exc:
            log.exception("could not load model %s", source.cache_key)
            # The cause (logged above) can name object keys and paths: none of it is the client's.
            raise Unavailable(f"model {source.cache_key} could not be loaded; retry later, and "
                              f"quote the request id if it persists") from exc

    def loaded(self, source: ModelSource) -> ServedStudent:
        """The loaded model for `source` (loading it on first use: call off the event loop)."""
        return self._get(source.cache_key, lambda: self._load(source))

    def student(self, source: ModelSource) -> Any:
        """The loaded ml_core Student for `source`."""
        return self.loaded(source).student

    async def served(self, source: ModelSource) -> ServedStudent:
        """The loaded model for `source`; a first load runs on a worker thread."""
        with self._lock:
            served = self._loaded.get(source.cache_key)
            if served is not None:
                self._loaded.move_to_end(source.cache_key)
                MODEL_CACHE.labels("hit").inc()
                return served
        return await run_in_threadpool(self.loaded, source)

    async def embed(self, served: ServedStudent, source: ModelSource,
                    tokenized: Tokenized) -> np.ndarray:
        """float32 [n, dim] vectors of the tokenized inputs, batched with concurrent requests."""
        try:
            return await self.batcher.run(source.cache_key, served.encode_ids, tokenized.ids,
                                          [len(row) for row in tokenized.ids])
        except Overloaded as exc:
            raise Unavailable(f"the embedding queue is full ({exc}); retry shortly",
                              headers={"Retry-After": "1"}) from exc

    def forget(self, cache_key: str) -> None:
        """Drop one model from the loaded set and its unpacked folder (a deleted model)."""
        with self._lock:
            self._loaded.pop(cache_key, None)
        remove_cached(self.cache_dir, cache_key)

    def clear(self) -> None:
        """Forget every loaded model (tests; memory pressure)."""
        with self._lock:
            self._loaded.clear()

    def close(self) -> None:
        """Stop the encoder threads (application shutdown)."""
        if self._batcher is not None:
            self._batcher.close()


def remove_cached(cache_dir: Path, model_id: str) -> None:
    """Delete a tuned model's unpacked folder."""
    shutil.rmtree(Path(cache_dir) / model_id, ignore_errors=True)
