"""Load teachers and score (query, document) pairs with them through the shared micro-batcher.

Any `ml_core.teacher.Teacher` serves: the route needs only `score(pairs)`. A teacher whose scores
are not logits says how to map them into 0..1 with a `relevance(scores)` method; otherwise a
sigmoid maps them, as cross-encoders trained with binary cross-entropy intend.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from app.embeddings.batching import Batcher, Overloaded
from app.errors import Unavailable
from app.models.service import get_base_spec
from ml_core.registry import ModelRegistry, ModelSpec

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # an estimate for batching only: the teacher tokenizes the pairs itself


def get_teacher_spec(registry: ModelRegistry, name: str) -> ModelSpec:
    """The registry spec of teacher `name` (404 for unknown names and non-teachers)."""
    return get_base_spec(registry, name, role="teacher")


def relevance(teacher: Any, scores: np.ndarray) -> np.ndarray:
    """Scores mapped into 0..1: the teacher's own `relevance` when it has one, else a sigmoid."""
    own = getattr(teacher, "relevance", None)
    if callable(own):
        return np.asarray(own(scores), dtype=np.float32)
    return (1.0 / (1.0 + np.exp(-scores.astype(np.float64)))).astype(np.float32)


class Rerankers:
    """Loaded teachers (least recently used evicted past `capacity`), scoring through `batcher`."""

    def __init__(self, batcher: Batcher | Any, capacity: int = 2) -> None:
        # `batcher` may be a zero-argument callable returning the Batcher (created lazily).
        self._batcher = batcher
        self.capacity = capacity
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    @property
    def batcher(self) -> Batcher:
        return self._batcher if isinstance(self._batcher, Batcher) else self._batcher()

    def teacher(self, spec: ModelSpec) -> Any:
        """The loaded teacher for `spec` (loads on first use: call off the event loop)."""
        with self._lock:
            if spec.name in self._loaded:
                self._loaded.move_to_end(spec.name)
                return self._loaded[spec.name]
        with self._load_lock:
            with self._lock:
                if spec.name in self._loaded:
                    return self._loaded[spec.name]
            from ml_core.teacher import load_teacher  # torch: only when a teacher is needed

            try:
                teacher = load_teacher(spec)
            except Exception as exc:
                log.exception("could not load teacher %s", spec.name)
                raise Unavailable(f"rerank model {spec.name} could not be loaded: {exc}") from exc
            with self._lock:
                self._loaded[spec.name] = teacher
                while len(self._loaded) > self.capacity:
                    self._loaded.popitem(last=False)
            return teacher

    def loaded(self, name: str) -> Any | None:
        """The teacher named `name` if it is loaded already."""
        with self._lock:
            return self._loaded.get(name)

    async def score(self, teacher: Any, name: str, query: str,
                    documents: list[str]) -> np.ndarray:
        """float32 [n] raw scores of (query, document) pairs, batched with concurrent requests."""
        pairs = [(query, document) for document in documents]
        limit = int(getattr(teacher, "max_length", 512))
        costs = [min(limit, (len(query) + len(d)) // CHARS_PER_TOKEN + 3) for d in documents]

        def run(batch: list[tuple[str, str]]) -> np.ndarray:
            return np.asarray(teacher.score(batch, batch_size=len(batch)),
                              dtype=np.float32)[:, None]

        try:
            rows = await self.batcher.run(f"teacher:{name}", run, pairs, costs)
        except Overloaded as exc:
            raise Unavailable(f"the rerank queue is full ({exc}); retry shortly",
                              headers={"Retry-After": "1"}) from exc
        return rows[:, 0]
