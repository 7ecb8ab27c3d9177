"""Dense search, BM25 and reciprocal rank fusion."""

from __future__ import annotations

import numpy as np
import pytest

from ml_core.records import Passage
from ml_core.retrieval import BM25Index, DenseIndex, reciprocal_rank_fusion, rrf_scores


def test_dense_index_returns_nearest_ids_best_first() -> None:
    vectors = np.eye(4, dtype=np.float32)
    index = DenseIndex.build(vectors, ["a", "b", "c", "d"], threads=1)
    queries = np.array([[0.1, 0.9, 0.2, 0.0], [0.0, 0.0, 0.3, 0.8]], dtype=np.float32)

    scores, ids = index.search(queries, k=2)

    assert ids == [["b", "c"], ["d", "c"]]
    np.testing.assert_allclose(scores, [[0.9, 0.2], [0.8, 0.3]], rtol=1e-6)


def test_dense_index_clips_k_to_size_and_checks_dimensions() -> None:
    index = DenseIndex.build(np.eye(3, dtype=np.float32), ["a", "b", "c"], threads=1)
    scores, ids = index.search(np.ones((1, 3), dtype=np.float32), k=10)
    assert len(ids[0]) == 3 and scores.shape == (1, 3)
    with pytest.raises(ValueError, match="shape"):
        index.search(np.ones((1, 4), dtype=np.float32), k=1)


def test_dense_index_normalize_turns_inner_product_into_cosine() -> None:
    # Unnormalised, the long vector wins on inner product; normalised, the aligned one wins.
    vectors = np.array([[10.0, 10.0], [1.0, 0.0]], dtype=np.float32)
    query = np.array([[1.0, 0.05]], dtype=np.float32)
    inner = DenseIndex.build(vectors, ["long", "aligned"], threads=1)
    assert inner.search(query, 1)[1] == [["long"]]
    cosine = DenseIndex.build(vectors, ["long", "aligned"], normalize=True, threads=1)
    assert cosine.search(query, 1)[1] == [["aligned"]]


def test_bm25_stems_uses_titles_and_omits_non_matching_passages() -> None:
    passages = [
        Passage("p1", "The wing was tested in a wind tunnel.", title="Aerodynamics"),
        Passage("p2", "Boundary layers grow along flat plates."),
        Passage("p3", "Cooking pasta takes ten minutes."),
    ]
    index = BM25Index(passages)

    scores, ids = index.search(["testing wings", "aerodynamics", "the of and"], k=3)

    assert ids[0] == ["p1"]  # "testing" -> "test", "wings" -> "wing"; no other passage matches
    assert ids[1] == ["p1"]  # found through its title
    assert ids[2] == [] and scores[2] == []  # stopwords only: no arbitrary zero-score list
    assert scores[0][0] > 0


def test_rrf_scores_follow_the_formula() -> None:
    scores = rrf_scores([["a", "b"], ["b", "c"]], k=60)
    assert scores["a"] == pytest.approx(1 / 61)
    assert scores["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert scores["c"] == pytest.approx(1 / 62)


def test_reciprocal_rank_fusion_rewards_agreement() -> None:
    dense = ["d1", "shared", "d3"]
    sparse = ["s1", "shared", "s3"]
    fused = reciprocal_rank_fusion([dense, sparse], k=60)
    assert fused[0] == "shared"
    assert set(fused) == {"d1", "d3", "s1", "s3", "shared"}
    # d1 and s1 tie on score and best rank: the first-seen list wins.
    assert fused[1:3] == ["d1", "s1"]
