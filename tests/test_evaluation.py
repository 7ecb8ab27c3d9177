"""Metrics against hand computation, chunk max-pooling, teacher rerank and the report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml_core.config import EvaluationConfig
from ml_core.evaluation import (
    build_report,
    evaluate_retriever,
    metrics_from_rankings,
    paired_difference,
    pool_to_documents,
    ranking_from_scores,
    rerank_metrics,
    teacher_check,
)
from ml_core.records import Passage, Query


def _dcg(gains: list[int]) -> float:
    # trec_eval's nDCG: linear gain, log2(rank + 1) discount.
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def test_metrics_match_hand_computed_ndcg_recall_and_mrr() -> None:
    qrels = {"q1": {"d1": 2, "d3": 1, "d9": 1}, "q2": {"d5": 1}}
    rankings = {"q1": ["d2", "d1", "d3", "d4"], "q2": ["d6", "d7"]}

    metrics = metrics_from_rankings(rankings, qrels, k_values=(10, 3))

    q1_ndcg = _dcg([0, 2, 1, 0]) / _dcg([2, 1, 1])
    assert metrics["ndcg@10"] == pytest.approx((q1_ndcg + 0.0) / 2, abs=1e-6)
    # q1 found 2 of 3 relevant documents in its top 3; q2 none.
    assert metrics["recall@3"] == pytest.approx((2 / 3 + 0) / 2, abs=1e-6)
    assert metrics["mrr@10"] == pytest.approx((1 / 2 + 0) / 2, abs=1e-6)
    assert metrics["queries"] == 2


def test_mrr_is_cut_at_ten() -> None:
    ranking = [f"n{i}" for i in range(10)] + ["rel"]
    metrics = metrics_from_rankings({"q": ranking}, {"q": {"rel": 1}})
    assert metrics["mrr@10"] == 0.0
    assert metrics["recall@100"] == 1.0


def test_queries_without_relevant_judgements_are_not_averaged() -> None:
    metrics = metrics_from_rankings(
        {"q1": ["d1"], "q2": ["d2"]}, {"q1": {"d1": 1}, "q2": {"d2": 0}}
    )
    assert metrics["queries"] == 1 and metrics["ndcg@10"] == pytest.approx(1.0)


def test_ranking_helpers_max_pool_chunks_to_documents() -> None:
    ids = ["a#0", "b", "a#1", "c"]
    scores = np.array([0.2, 0.5, 0.9, 0.1])
    doc_of = {"a#0": "a", "a#1": "a"}
    assert ranking_from_scores(ids, scores, document_of=doc_of) == [
        ("a", 0.9),
        ("b", 0.5),
        ("c", 0.1),
    ]
    assert ranking_from_scores(ids, scores, k=2) == [("a#1", 0.9), ("b", 0.5)]
    assert pool_to_documents(["a#1", "b", "a#0", "c"], doc_of) == ["a", "b", "c"]


class KeywordStudent:
    """A bag-of-words encoder over a fixed vocabulary: deterministic and easy to reason about."""

    vocab = ["wing", "shock", "pasta", "river", "boat"]

    def _encode(self, texts: list[str]) -> np.ndarray:
        rows = [[float(text.lower().count(w)) for w in self.vocab] for text in texts]
        vectors = np.array(rows, dtype=np.float32) + 1e-3
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def encode_queries(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return self._encode(texts)

    def encode_passages(self, passages: list, batch_size: int = 32) -> np.ndarray:
        return self._encode([p.text if isinstance(p, Passage) else p for p in passages])


def test_evaluate_retriever_scores_documents_by_their_best_chunk_and_by_type() -> None:
    passages = [
        Passage("doc1#0", "pasta pasta", parent_id="doc1"),
        Passage("doc1#1", "wing shock", parent_id="doc1"),
        Passage("doc2", "river boat"),
        Passage("doc3", "wing river"),
    ]
    queries = [
        Query("q1", "shock wing", query_type="keywords"),
        Query("q2", "boat on a river", query_type="questions"),
    ]
    qrels = {"q1": {"doc1": 1}, "q2": {"doc3": 1}}

    metrics = evaluate_retriever(KeywordStudent(), passages, queries, qrels)

    # q1: doc1's second chunk is the best match, so doc1 ranks first. q2: doc2 beats doc3.
    assert metrics["per_query_type"]["keywords"]["mrr@10"] == pytest.approx(1.0)
    assert metrics["per_query_type"]["questions"]["mrr@10"] == pytest.approx(0.5)
    assert metrics["mrr@10"] == pytest.approx(0.75)
    assert metrics["recall@100"] == pytest.approx(1.0)
    # Per-query nDCG@10 is kept for paired comparisons: q2's relevant doc3 is second.
    assert metrics["per_query"] == pytest.approx({"q1": 1.0, "q2": 1 / math.log2(3)})


class OracleTeacher:
    """Scores 1 for the passage the test says is relevant, 0 otherwise."""

    def __init__(self, relevant_text: str) -> None:
        self.relevant_text = relevant_text
        self.pairs: list[tuple[str, str]] = []

    def score(self, pairs, batch_size=32, progress=None) -> np.ndarray:
        self.pairs.extend(pairs)
        return np.array([1.0 if p == self.relevant_text else 0.0 for _, p in pairs])


def test_rerank_metrics_reorders_only_the_head_and_keeps_the_tail() -> None:
    passages = [Passage(f"d{i}", f"text {i}") for i in range(5)]
    teacher = OracleTeacher("text 2")
    first_stage = {"q": ["d0", "d1", "d2", "d3", "d4"]}
    qrels = {"q": {"d2": 1, "d4": 1}}

    metrics = rerank_metrics(teacher, [Query("q", "query")], passages, first_stage, qrels, depth=3)

    assert len(teacher.pairs) == 3  # only the head is scored
    # Reranked: d2, d0, d1 | d3, d4. nDCG = (1 + 1/log2(6)) / (1 + 1/log2(3)).
    expected = (1 + 1 / math.log2(6)) / (1 + 1 / math.log2(3))
    assert metrics["ndcg@10"] == pytest.approx(expected, abs=1e-6)
    assert metrics["recall@100"] == pytest.approx(1.0)


def test_teacher_check_compares_teacher_rerank_with_student() -> None:
    passages = [Passage("a", "wing wing"), Passage("b", "wing shock"), Passage("c", "pasta")]
    queries = [Query("q", "wing")]
    qrels = {"q": {"b": 1}}
    check = teacher_check(KeywordStudent(), OracleTeacher("wing shock"), passages, queries, qrels)
    assert check["method"] == "judged_rerank"
    assert check["student"] == pytest.approx(1 / math.log2(3))  # student ranks b second
    assert check["teacher"] == pytest.approx(1.0)


def _metrics(ndcg: float, queries: int = 50) -> dict:
    return {"ndcg@10": ndcg, "recall@100": 0.8, "mrr@10": ndcg, "queries": queries}


def test_report_recommends_tuned_only_above_min_gain() -> None:
    good_check = {"method": "judged_rerank", "queries": 50, "teacher": 0.6, "student": 0.4}
    report = build_report(
        _metrics(0.40), _metrics(0.45), good_check, EvaluationConfig(min_gain=0.01), "customer"
    )
    assert report["recommended"] == "tuned"
    assert report["gain"]["ndcg@10"] == pytest.approx(0.05)
    assert report["warnings"] == []
    assert report["judgements"] == "customer"

    small = build_report(
        _metrics(0.40), _metrics(0.405), good_check, EvaluationConfig(min_gain=0.01), "customer"
    )
    assert small["recommended"] == "base"
    assert "does not exceed" in small["warnings"][0]

    # A customer may accept a small loss (min_gain below 0); the warning must not then claim
    # the base stays recommended.
    allowed = build_report(
        _metrics(0.40), _metrics(0.39), good_check, EvaluationConfig(min_gain=-0.02), "customer"
    )
    assert allowed["recommended"] == "tuned"
    assert allowed["warnings"] == [
        "tuned model is worse than base (-0.0100 nDCG@10) but recommended: "
        "evaluation.min_gain (-0.0200) allows a loss"
    ]


def test_report_warns_when_tuned_is_worse_and_teacher_is_no_better() -> None:
    weak_check = {"method": "judged_rerank", "queries": 50, "teacher": 0.38, "student": 0.38}
    base = {**_metrics(0.40, queries=12), "per_query_type": {"questions": _metrics(0.4, 12)}}
    tuned = {**_metrics(0.35, queries=12), "per_query_type": {"questions": _metrics(0.3, 12)}}

    report = build_report(base, tuned, weak_check, EvaluationConfig(), "synthetic")

    assert report["recommended"] == "base"
    assert "tuned model is worse than base: keeping base as recommendation" in report["warnings"]
    assert (
        "teacher is no better than the student on this corpus: gains are capped"
        in report["warnings"]
    )
    assert any("12 evaluation queries" in w for w in report["warnings"])
    assert report["per_query_type"]["questions"]["gain"]["ndcg@10"] == pytest.approx(-0.1)
    assert "per_query_type" not in report["base"]
    assert "round-trip" in report["teacher_check"]["caveat"]  # synthetic rerank check is biased


def test_report_says_when_training_kept_the_base_model() -> None:
    """best epoch 0: "tuned" is the base's weights, so a difference is numerics, not a result."""
    check = {"method": "judged_rerank", "queries": 50, "teacher": 0.6, "student": 0.4}
    base = {**_metrics(0.40), "per_query": {"a": 0.5, "b": 0.3}}
    tuned = {**_metrics(0.4005), "per_query": {"a": 0.501, "b": 0.3}}
    cfg = EvaluationConfig(min_gain=0.0)

    report = build_report(base, tuned, check, cfg, "customer", base_kept=True)
    assert report["base_kept"] is True and report["recommended"] == "base"
    assert report["warnings"] == [
        "training never beat the base model on the synthetic dev loss, so the tuned model is the "
        "base model: base is recommended, and any difference between the two rows is encoding "
        "numerics"
    ]
    # Rows that are one and the same (what the pipeline passes): no talk of numerics.
    same = build_report(base, dict(base), check, cfg, "customer", base_kept=True)
    assert same["warnings"] == [
        "training never beat the base model on the synthetic dev loss, so the tuned model is the "
        "base model: base is recommended"
    ]
    trained = build_report(base, tuned, check, cfg, "customer")
    assert trained["base_kept"] is False and trained["recommended"] == "tuned"
    assert any("within noise" in w for w in trained["warnings"])


def test_report_says_when_the_base_was_kept_on_too_few_dev_queries() -> None:
    """A dev loss over 8 queries cannot tell a better model from noise: the customer is told why
    the base was kept and what to give the job; a large dev split or a trained model gets no
    such warning."""
    check = {"method": "judged_rerank", "queries": 50, "teacher": 0.6, "student": 0.4}
    base = {**_metrics(0.40), "per_query": {"a": 0.5, "b": 0.3}}
    tuned = {**_metrics(0.43), "per_query": {"a": 0.55, "b": 0.31}}
    cfg = EvaluationConfig(min_gain=0.0)

    small = build_report(base, dict(base), check, cfg, "customer", base_kept=True, dev_queries=8)
    dev_warnings = [w for w in small["warnings"] if "dev queries" in w]
    assert len(dev_warnings) == 1
    assert "only 8 dev queries" in dev_warnings[0]
    assert "generation.passages" in dev_warnings[0] and "training.dev_fraction" in dev_warnings[0]
    for report in (
        build_report(base, dict(base), check, cfg, "customer", base_kept=True, dev_queries=30),
        build_report(base, dict(base), check, cfg, "customer", base_kept=True),
        build_report(base, tuned, check, cfg, "customer", dev_queries=8),
    ):
        assert not any("dev queries" in w for w in report["warnings"])


def test_paired_difference_matches_the_exact_randomization_test() -> None:
    # Three queries each better by 1: of the 8 equally likely sign patterns, 2 (all kept, all
    # flipped) are as extreme as the observed mean, so the exact two-sided p is 0.25.
    result = paired_difference({"a": 0, "b": 0, "c": 0, "x": 5}, {"a": 1, "b": 1, "c": 1})
    assert result["queries"] == 3  # "x" has no tuned score: unpaired, left out
    assert result["difference"] == pytest.approx(1.0)
    assert result["p_value"] == pytest.approx(0.25, abs=0.015)
    assert result["ci95"] == pytest.approx([1.0, 1.0])
    assert (result["better"], result["worse"], result["same"]) == (3, 0, 0)
    assert paired_difference({"a": 0, "b": 0, "c": 0}, {"a": 1, "b": 1, "c": 1}) == {
        k: v for k, v in result.items()}  # fixed seed: the same answer every time


def test_paired_difference_separates_a_consistent_gain_from_noise() -> None:
    rng = np.random.default_rng(7)
    base = {f"q{i}": float(v) for i, v in enumerate(rng.uniform(0.2, 0.8, 200))}
    consistent = {q: v + 0.02 + rng.normal(0, 0.01) for q, v in base.items()}
    # Half the queries +0.2, half -0.2 (plus 0.001): a mean gain of 0.001 that is pure noise.
    noise = {q: v + (0.201 if i % 2 else -0.199) for i, (q, v) in enumerate(base.items())}

    sure = paired_difference(base, consistent)
    assert sure["p_value"] < 0.001
    assert 0.0 < sure["ci95"][0] < sure["difference"] < sure["ci95"][1]

    unsure = paired_difference(base, noise)
    assert unsure["ci95"][0] < 0.0 < unsure["ci95"][1]
    assert unsure["p_value"] > 0.05
    tie = paired_difference({"a": 0.5, "b": 0.2}, {"a": 0.6, "b": 0.1})
    assert tie["difference"] == pytest.approx(0.0) and tie["p_value"] == pytest.approx(1.0)


def test_report_says_how_sure_the_gain_is() -> None:
    from ml_core.report import report_lines

    check = {"method": "judged_rerank", "queries": 50, "teacher": 0.6, "student": 0.4}
    base_scores = {f"q{i}": 0.4 + 0.01 * (i % 5) for i in range(60)}
    lifted = {q: v + 0.05 for q, v in base_scores.items()}
    wobbly = {q: v + (0.3 if i % 2 else -0.29) for i, (q, v) in enumerate(base_scores.items())}
    base = {**_metrics(0.42, 60), "per_query": base_scores}

    clear = build_report(base, {**_metrics(0.47, 60), "per_query": lifted}, check,
                         EvaluationConfig(), "customer")
    assert clear["significance"]["ci95"] == pytest.approx([0.05, 0.05])
    assert clear["significance"]["metric"] == "ndcg@10"
    assert clear["warnings"] == []
    assert clear["per_query"]["q3"] == pytest.approx({"base": 0.43, "tuned": 0.48})
    assert "per_query" not in clear["base"] and "per_query" not in clear["tuned"]
    assert any(line.startswith("nDCG@10 gain: 95% interval [+0.0500, +0.0500]")
               for line in report_lines(clear))
    assert "nDCG@10" in report_lines(clear)[1]  # the header spells the metrics for people

    noisy = build_report(base, {**_metrics(0.425, 60), "per_query": wobbly}, check,
                         EvaluationConfig(), "customer")
    assert noisy["recommended"] == "tuned"  # above min_gain; the warning says it is not sure
    assert any("within noise" in w and "includes 0" in w for w in noisy["warnings"])
    # Without per-query scores (an older report) there is no significance, and no warning.
    assert "significance" not in build_report(_metrics(0.40), _metrics(0.45), check,
                                              EvaluationConfig(), "customer")


def test_p_values_print_for_people() -> None:
    """The smallest p the randomization test gives is 1 / (resamples + 1): never print it as
    0.000, which would claim certainty."""
    from ml_core.report import format_p

    assert format_p(1 / 10_001) == "p < 0.001"
    assert format_p(0.0005) == "p = 0.001"
    assert format_p(0.0137) == "p = 0.014"


def test_the_demo_states_the_gain_and_what_its_interval_says() -> None:
    from app.demo import verdict

    check = {"method": "judged_rerank", "queries": 50, "teacher": 0.6, "student": 0.4}
    base_scores = {f"q{i}": 0.4 + 0.01 * (i % 5) for i in range(60)}
    base = {**_metrics(0.42, 60), "per_query": base_scores}
    lifted = {q: v + 0.05 for q, v in base_scores.items()}
    wobbly = {q: v + (0.3 if i % 2 else -0.29) for i, (q, v) in enumerate(base_scores.items())}
    clear = build_report(base, {**_metrics(0.47, 60), "per_query": lifted}, check,
                         EvaluationConfig(), "customer")
    assert verdict(clear) == ("nDCG@10 base 0.4200 -> tuned 0.4700, gain +0.0500, 95% interval "
                              "[+0.0500, +0.0500] above 0: the tuned model is better; "
                              "recommended: tuned")
    noisy = build_report(base, {**_metrics(0.425, 60), "per_query": wobbly}, check,
                         EvaluationConfig(), "customer")
    assert "includes 0: not distinguishable from the base" in verdict(noisy)
    kept = build_report(base, base, check, EvaluationConfig(), "customer", base_kept=True)
    assert verdict(kept).endswith("training never beat the base on the dev split, so the base "
                                  "is kept")
