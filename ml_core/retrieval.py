"""First-stage retrieval: exact dense search (faiss), stemmed BM25 (bm25s), and rank fusion."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ml_core.records import Passage

# faiss's OpenMP threads fight torch's for the same cores: on a 2-core machine one faiss thread
# is faster than two (docs/architecture.md), while big machines keep faiss's default.
SMALL_MACHINE_CORES = 2


def configure_faiss_threads(threads: int | None = None) -> int:
    """Set faiss's OpenMP thread count (default: 1 on machines with <= 2 cores); returns it."""
    import faiss

    if threads is None:
        cores = os.cpu_count() or 1
        threads = 1 if cores <= SMALL_MACHINE_CORES else faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(threads))
    return int(threads)


class DenseIndex:
    """Exact inner-product search (faiss IndexFlatIP) over float32 vectors with string ids.

    Vectors are searched as given: a student that normalises its embeddings makes this cosine
    search; one trained for dot product keeps its own geometry. `normalize=True` forces cosine.
    """

    def __init__(self, dim: int, normalize: bool = False, threads: int | None = None) -> None:
        import faiss

        configure_faiss_threads(threads)
        self.index = faiss.IndexFlatIP(dim)
        self.normalize = normalize
        self.ids: list[str] = []

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: Sequence[str],
        normalize: bool = False,
        threads: int | None = None,
    ) -> DenseIndex:
        """An index holding `vectors` (n x dim) under `ids`."""
        index = cls(int(np.asarray(vectors).shape[1]), normalize=normalize, threads=threads)
        index.add(vectors, ids)
        return index

    def __len__(self) -> int:
        return len(self.ids)

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.index.d:
            raise ValueError(f"expected vectors of shape (n, {self.index.d}), got {vectors.shape}")
        if self.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors

    def add(self, vectors: np.ndarray, ids: Sequence[str]) -> None:
        """Append vectors under the given ids (one id per row)."""
        if len(ids) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        self.index.add(self._prepare(vectors))
        self.ids.extend(ids)

    def search(self, q_vecs: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """(scores n x k' float32, ids: one list of k' passage ids per query), best first.

        k' = min(k, index size).
        """
        k = min(k, len(self.ids))
        queries = self._prepare(q_vecs)
        if k == 0 or len(queries) == 0:
            return np.zeros((len(queries), 0), dtype=np.float32), [[] for _ in queries]
        scores, rows = self.index.search(queries, k)
        return scores, [[self.ids[r] for r in row if r >= 0] for row in rows]


class BM25Index:
    """BM25 (bm25s, Lucene variant) over title + text, English stopwords and Snowball stemming."""

    def __init__(self, passages: Sequence[Passage], language: str = "english") -> None:
        import bm25s
        import Stemmer

        self.ids = [p.id for p in passages]
        self._stemmer = Stemmer.Stemmer(language)
        self._stopwords = "en" if language == "english" else None
        corpus = [f"{p.title} {p.text}" if p.title else p.text for p in passages]
        self.retriever = bm25s.BM25()
        if corpus:
            self.retriever.index(self._tokenize(corpus), show_progress=False)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(
            texts, stopwords=self._stopwords, stemmer=self._stemmer, return_ids=False,
            show_progress=False,
        )

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, texts: Sequence[str], k: int) -> tuple[list[list[float]], list[list[str]]]:
        """(scores, ids) per query, best first, at most k each.

        Passages with no matching term (score 0) are left out rather than listed in arbitrary
        order, so a list may be shorter than k (empty for a query of stopwords only).
        """
        k = min(k, len(self.ids))
        if k == 0 or not texts:
            return [[] for _ in texts], [[] for _ in texts]
        rows, scores = self.retriever.retrieve(
            self._tokenize(list(texts)), k=k, show_progress=False, n_threads=1
        )
        out_scores: list[list[float]] = []
        out_ids: list[list[str]] = []
        for row, row_scores in zip(rows, scores, strict=True):
            keep = row_scores > 0
            out_scores.append([float(s) for s in row_scores[keep]])
            out_ids.append([self.ids[int(r)] for r in row[keep]])
        return out_scores, out_ids


def rrf_scores(rankings: Sequence[Sequence[str]], k: int = 60) -> dict[str, float]:
    """Reciprocal rank fusion scores: sum over rankings of 1 / (k + rank), rank from 1.

    Cormack, Clarke and Buettcher 2009, "Reciprocal Rank Fusion outperforms Condorcet and
    individual Rank Learning Methods" (SIGIR). An id missing from a ranking gets nothing from it.
    """
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, pid in enumerate(ranking, start=1):
            fused[pid] = fused.get(pid, 0.0) + 1.0 / (k + rank)
    return fused


def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], k: int = 60) -> list[str]:
    """Ids ordered by reciprocal rank fusion score (ties: best single rank, then first seen)."""
    fused = rrf_scores(rankings, k)
    best_rank: dict[str, int] = {}
    for ranking in rankings:
        for rank, pid in enumerate(ranking):
            best_rank[pid] = min(rank, best_rank.get(pid, rank))
    order = {pid: i for i, pid in enumerate(fused)}
    return sorted(fused, key=lambda pid: (-fused[pid], best_rank[pid], order[pid]))
