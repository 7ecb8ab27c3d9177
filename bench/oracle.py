"""A teacher that knows the answers: the upper bound of a better teacher, for analysis only.

`oracle-e8` (bench.quality) is `supplied-e8` with the job's teacher replaced by the dataset's own
judgements: a (query, passage) pair scores the judged grade of the passage's document for that
query (0 when unjudged), and the target is that grade alone (`teacher_signal: cross_encoder`).
It trains cross-fitted like `supplied-e8` (bench.cross_fit): fold f's model learns the other
folds' queries with their judgements and is scored on fold f, whose judgements it never saw,
so the figure is an honest test figure of a perfect teacher on real queries at this training
scale. Nothing the product runs can use it: it exists to say how much of the gap to +0.02 a
stronger teacher could close, and it changes no default.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ml_core.records import ProgressFn, Query, no_progress

ORACLE_VARIANTS = ("oracle-e8", "oracle-raw-e8", "oracle-anchor-e8", "oracle-easy-e8")


class QrelsScorer:
    """Scores pairs by the judgements: the passage's document's grade for the query's text (the
    highest over judged queries sharing that text), 0 when unjudged. Passages are known by their
    text as the teacher sees it (ml_core.candidates.passage_text), read from a prepare stage's
    passages.jsonl on first use, since the stage runs after this scorer is made."""

    name = "judgements"

    def __init__(self, queries: Sequence[Query], qrels: dict[str, dict[str, int]],
                 passages_file: Path) -> None:
        self.grades: dict[str, dict[str, int]] = {}
        for query in queries:
            for doc, grade in qrels.get(query.id, {}).items():
                known = self.grades.setdefault(query.text, {})
                known[doc] = max(known.get(doc, 0), int(grade))
        self.passages_file = passages_file
        self._documents: dict[str, set[str]] | None = None
        self.pairs_scored = 0
        self.pairs_judged = 0

    def _documents_of(self) -> dict[str, set[str]]:
        if self._documents is None:
            from ml_core.candidates import passage_text
            from ml_core.records import Passage, read_jsonl

            documents: dict[str, set[str]] = {}
            for passage in read_jsonl(self.passages_file, Passage):
                documents.setdefault(passage_text(passage), set()).add(passage.document_id)
            self._documents = documents
        return self._documents

    def score(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
              progress: ProgressFn | None = None) -> np.ndarray:
        del batch_size
        documents = self._documents_of()
        scores = np.zeros(len(pairs), dtype=np.float32)
        for i, (query, passage) in enumerate(pairs):
            judged = self.grades.get(query, {})
            scores[i] = max((judged.get(doc, 0) for doc in documents.get(passage, ())),
                            default=0)
        self.pairs_scored += len(pairs)
        self.pairs_judged += int(np.count_nonzero(scores))
        (progress or no_progress)(1.0, f"judgements scored {len(pairs)} pairs")
        return scores


@contextmanager
def judgements_as_teacher(queries: Path, qrels: Path, workdir: Path) -> Iterator[QrelsScorer]:
    """While open, every teacher ml_core loads (the filter's, the teacher check's) is the
    judgements. The passages come from the first fold's prepare stage (every fold prepares the
    same corpus the same way)."""
    import ml_core.teacher as teacher_module
    from ml_core.corpus import read_qrels, read_queries

    scorer = QrelsScorer(list(read_queries(queries)), read_qrels(qrels),
                         workdir / "fold0" / "prepare" / "passages.jsonl")
    original = teacher_module.load_teacher

    def load_judgements(*args: Any, **kwargs: Any) -> QrelsScorer:
        del args, kwargs
        return scorer

    teacher_module.load_teacher = load_judgements  # type: ignore[assignment]
    try:
        yield scorer
    finally:
        teacher_module.load_teacher = original
