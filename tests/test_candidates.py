"""Candidate mining, teacher scoring with the round-trip filter, and the passage split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ml_core.candidates import (
    Candidates,
    mine_candidates,
    score_and_filter,
    split_by_passage,
    teacher_agreement,
)
from ml_core.config import CandidateConfig
from ml_core.records import Passage, Query


class KeywordStudent:
    """Bag-of-words embeddings over a fixed vocabulary: rankings a test can predict."""

    vocab = ["wing", "shock", "flutter", "heat", "plate", "noise"]

    def __init__(self) -> None:
        self.encoded_passages = 0

    def _encode(self, texts: list[str]) -> np.ndarray:
        rows = [[float(t.lower().split().count(w)) for w in self.vocab] for t in texts]
        vectors = np.array(rows, dtype=np.float32) + 1e-3
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def encode_queries(self, texts, batch_size=32, progress=None) -> np.ndarray:
        return self._encode(list(texts))

    def encode_passages(self, passages, batch_size=32, progress=None) -> np.ndarray:
        self.encoded_passages += len(passages)
        return self._encode([p.text for p in passages])


class TableTeacher:
    """Scores pairs from a table keyed by (query text, passage text); records what it scored."""

    def __init__(self, table: dict[tuple[str, str], float], default: float = 0.0) -> None:
        self.table = table
        self.default = default
        self.scored: list[tuple[str, str]] = []

    def score(self, pairs, batch_size=32, progress=None) -> np.ndarray:
        self.scored.extend(pairs)
        return np.array([self.table.get(pair, self.default) for pair in pairs], dtype=np.float32)


PASSAGES = [
    Passage("p1", "wing wing shock"),
    Passage("p2", "wing flutter"),
    Passage("p3", "heat plate"),
    Passage("p4", "heat heat noise"),
    Passage("p5", "plate noise noise"),
]


def test_mine_candidates_fuses_student_and_bm25_and_records_source_rank() -> None:
    queries = [Query("q1", "wing flutter", "questions", source_id="p2"),
               Query("q2", "noise", "keywords", source_id="p3")]
    cfg = CandidateConfig(top_k=3, student_top_n=4, rrf_k=60)
    student = KeywordStudent()

    mined = mine_candidates(queries, PASSAGES, student, cfg)

    q1 = mined["q1"]
    assert q1.student_ids[:2] == ["p2", "p1"]  # exact match first, then the other wing passage
    assert len(q1.student_ids) == 4  # deep enough for the round-trip check (student_top_n)
    assert q1.passage_ids[0] == "p2" and len(q1.passage_ids) == 3
    assert q1.rrf == sorted(q1.rrf, reverse=True)
    assert q1.rrf[0] == pytest.approx(2 / 61)  # first in both lists
    assert q1.source_rank == 1
    assert set(mined["q2"].bm25_ids) == {"p4", "p5"}  # BM25 lists only passages with "noise"
    assert mined["q2"].source_rank is None or mined["q2"].source_rank > 2
    assert student.encoded_passages == len(PASSAGES)


def test_mine_candidates_reuses_given_passage_vectors_and_can_skip_bm25() -> None:
    student = KeywordStudent()
    vectors = student.encode_passages(PASSAGES)
    cfg = CandidateConfig(top_k=2, student_top_n=2, use_bm25=False)
    mined = mine_candidates([Query("q", "heat", source_id="p4")], PASSAGES, student, cfg,
                            passage_vectors=vectors)
    assert student.encoded_passages == len(PASSAGES)  # only the explicit call above
    assert mined["q"].bm25_ids == [] and mined["q"].passage_ids == mined["q"].student_ids


def test_easy_candidates_fill_the_last_slots_from_deeper_ranks_seeded() -> None:
    """candidates.easy_k: the hard part is the fused top as without it; the rest are drawn from
    the fused ranks below it (down to easy_depth), in rank order, the same draw for a seed."""
    passages = [Passage(f"d{i:02d}", " ".join(["wing"] * (30 - i) + ["plate"] * i))
                for i in range(30)]
    query = Query("q", "wing", source_id="d00")
    hard_cfg = CandidateConfig(top_k=6, student_top_n=6)
    easy_cfg = CandidateConfig(top_k=6, student_top_n=6, easy_k=2, easy_depth=20)
    plain = mine_candidates([query], passages, KeywordStudent(), hard_cfg)["q"]
    mixed = mine_candidates([query], passages, KeywordStudent(), easy_cfg, seed=3)["q"]
    again = mine_candidates([query], passages, KeywordStudent(), easy_cfg, seed=3)["q"]
    other = [mine_candidates([query], passages, KeywordStudent(), easy_cfg, seed=s)["q"]
             for s in range(4, 10)]
    assert mixed.passage_ids[:4] == plain.passage_ids[:4] and len(mixed.passage_ids) == 6
    assert mixed.rrf[:4] == plain.rrf[:4]
    easy = mixed.passage_ids[4:]
    assert len(set(mixed.passage_ids)) == 6 and not set(easy) & set(plain.passage_ids[:4])
    assert all(int(pid[1:]) < 20 for pid in easy)  # within easy_depth of the fused ranking
    assert mixed.passage_ids == again.passage_ids
    assert any(o.passage_ids[4:] != easy for o in other)  # the draw follows the seed
    assert mixed.student_ids == plain.student_ids and mixed.bm25_ids == plain.bm25_ids
    assert any(int(pid[1:]) >= 6 for o in other for pid in o.passage_ids[4:])  # below the top


def test_easy_candidates_leave_a_hard_one_and_reach_below_the_list() -> None:
    with pytest.raises(ValueError, match="easy_k"):
        CandidateConfig(top_k=4, easy_k=4)
    with pytest.raises(ValueError, match="easy_depth"):
        CandidateConfig(top_k=16, easy_k=4, easy_depth=16)


class PreferenceHelper:
    """A helper retriever that ranks every query's passages by a fixed preference."""

    def __init__(self, preference: dict[str, float]) -> None:
        self.preference = preference
        self.encoded_passages = 0

    def encode_queries(self, texts, batch_size=32, progress=None) -> np.ndarray:
        row = [self.preference.get(p.id, 0.0) for p in PASSAGES]
        return np.array([row] * len(texts), dtype=np.float32)

    def encode_passages(self, passages, batch_size=32, progress=None) -> np.ndarray:
        self.encoded_passages += len(passages)
        return np.eye(len(PASSAGES), dtype=np.float32)[[PASSAGES.index(p) for p in passages]]


def test_helper_retrievers_join_the_fusion_and_their_lists_are_kept() -> None:
    query = Query("q", "wing plate", source_id="p1")
    cfg = CandidateConfig(top_k=2, student_top_n=2, use_bm25=False)
    student, helper = KeywordStudent(), PreferenceHelper({"p3": 2.0, "p5": 1.0})

    alone = mine_candidates([query], PASSAGES, student, cfg)["q"]
    helped = mine_candidates([query], PASSAGES, student, cfg, helpers=[(helper, None)])["q"]

    assert helper.encoded_passages == len(PASSAGES)  # no vectors given: the helper encodes
    assert helped.helper_ids == [["p3", "p5"]]  # the helper's top 2, best first
    assert alone.helper_ids == [] and alone.passage_ids == alone.student_ids[:2]
    # p3 is the helper's #1 and not in the student's two: the helper's vote puts it level with
    # the student's #1 and ahead of the student's #2 (p2), which the fused top 2 now leaves out.
    assert "p3" not in alone.passage_ids
    assert set(helped.passage_ids) == {"p1", "p3"}
    assert helped.rrf == pytest.approx([1 / 61, 1 / 61])
    assert helped.student_ids == alone.student_ids  # the round trip still reads the student


def test_helper_vectors_given_are_not_encoded_again() -> None:
    helper = PreferenceHelper({"p5": 1.0})
    vectors = helper.encode_passages(PASSAGES)
    cfg = CandidateConfig(top_k=2, student_top_n=2, use_bm25=False)
    queries = [Query("a", "plate", source_id="p3"), Query("b", "heat", source_id="p4")]
    mined = mine_candidates(queries, PASSAGES, KeywordStudent(), cfg, helpers=[(helper, vectors)])
    assert helper.encoded_passages == len(PASSAGES)  # only the explicit call above
    assert [len(mined[q.id].helper_ids) for q in queries] == [1, 1]


def test_helpers_named_twice_are_refused() -> None:
    with pytest.raises(ValueError, match="more than once"):
        CandidateConfig(helpers=["bge-small", "bge-small"])


def _cand(qid: str, fused: list[str], student: list[str], bm25: list[str] | None = None,
          source_rank: int | None = 1) -> Candidates:
    rrf = [1 / (60 + i) for i in range(1, len(fused) + 1)]
    return Candidates(qid, fused, rrf, student, bm25 or [], source_rank)


def _text(pid: str, passages: list[Passage] | None = None) -> str:
    return next(p.text for p in passages or PASSAGES if p.id == pid)


def test_score_and_filter_applies_round_trip_and_orders_lists() -> None:
    queries = [
        Query("good", "wing", "questions", source_id="p1"),
        Query("teacher_disagrees", "heat", "questions", source_id="p3"),
        Query("student_missed", "flutter", "claims", source_id="p2"),
        Query("outside", "noise", "claims", source_id="p5"),
    ]
    candidates = {
        "good": _cand("good", ["p2", "p1", "p3"], ["p2", "p1", "p3"], source_rank=2),
        "teacher_disagrees": _cand("teacher_disagrees", ["p3", "p4"], ["p3", "p4"]),
        "student_missed": _cand("student_missed", ["p1", "p2"], ["p1", "p4", "p2"], source_rank=3),
        # The source is in neither list: the teacher still scores it, appended to the pool.
        "outside": _cand("outside", ["p4", "p3"], ["p4", "p3"], source_rank=None),
    }
    teacher = TableTeacher({
        ("wing", _text("p1")): 9.0, ("wing", _text("p2")): 4.0, ("wing", _text("p3")): 5.0,
        ("heat", _text("p3")): 3.0, ("heat", _text("p4")): 5.0,
        ("flutter", _text("p1")): 1.0, ("flutter", _text("p2")): 8.0,
        ("noise", _text("p4")): 2.0, ("noise", _text("p3")): 0.0, ("noise", _text("p5")): 7.0,
    })
    cfg = CandidateConfig(student_top_n=2, min_score_percentile=0.0, teacher_signal="cross_encoder")

    result = score_and_filter(queries, candidates, PASSAGES, teacher, cfg)

    assert len(teacher.scored) == 3 + 2 + 2 + 3  # fused top-k, plus the missing source once
    assert [q.id for q in result.kept] == ["good"]
    (scored,) = result.lists
    # Source first, then first-stage order (p2 before p3) although the teacher prefers p3.
    assert scored.passage_ids == ["p1", "p2", "p3"]
    assert scored.raw_scores == [9.0, 4.0, 5.0]
    assert all(0.0 <= s <= 1.0 for s in scored.teacher_scores)
    assert scored.teacher_scores[0] >= scored.teacher_scores[2] > scored.teacher_scores[1]
    summary = result.summary
    assert summary["dropped"] == {"round_trip_teacher": 1, "round_trip_student": 2}
    assert summary["by_type"]["questions"] == {"generated": 2, "kept": 1, "round_trip_teacher": 1}
    assert summary["by_type"]["claims"] == {"generated": 2, "kept": 0, "round_trip_student": 2}
    assert summary["pairs_scored"] == 10
    # The teacher-disagreement query comes back relabelled: the teacher's #1 (p4) is its positive.
    (relabeled,) = result.relabeled
    assert relabeled.query_id == "teacher_disagrees"
    assert relabeled.passage_ids == ["p4", "p3"] and relabeled.raw_scores == [5.0, 3.0]
    assert summary["relabeled"] == 1


def test_score_and_filter_drops_weak_queries_under_the_percentile() -> None:
    queries = [Query(f"q{i}", f"query {i}", "titles", source_id="p1") for i in range(4)]
    candidates = {q.id: _cand(q.id, ["p1", "p2"], ["p1", "p2"]) for q in queries}
    # Best scores 1, 2, 3, 4: the 50th percentile is 2.5, so q0 and q1 fall under it.
    table = {(f"query {i}", _text("p1")): float(i + 1) for i in range(4)}
    teacher = TableTeacher(table, default=-5.0)
    cfg = CandidateConfig(min_score_percentile=50.0, teacher_signal="cross_encoder")

    result = score_and_filter(queries, candidates, PASSAGES, teacher, cfg)

    assert [q.id for q in result.kept] == ["q2", "q3"]
    assert result.summary["dropped"] == {"low_score": 2}
    assert result.summary["thresholds"]["min_top_score"] == pytest.approx(2.5)


def test_a_supplied_query_has_the_signals_first_as_its_positive_and_no_round_trip() -> None:
    """A customer's own query (no source passage): the teacher's #1 becomes the positive, even
    where the student ranks it low, and only the score floor can drop it."""
    queries = [
        Query("log1", "heat", "supplied"),
        Query("log2", "noise", "supplied"),
        Query("gen", "wing", "questions", source_id="p1"),
    ]
    candidates = {
        "log1": _cand("log1", ["p3", "p4", "p5"], ["p3", "p4", "p5"], source_rank=None),
        "log2": _cand("log2", ["p5", "p4"], ["p5", "p4"], source_rank=None),
        "gen": _cand("gen", ["p1", "p2"], ["p1", "p2"]),
    }
    teacher = TableTeacher({
        ("heat", _text("p3")): 2.0, ("heat", _text("p4")): 6.0, ("heat", _text("p5")): 1.0,
        ("noise", _text("p5")): 0.5, ("noise", _text("p4")): 0.2,
        ("wing", _text("p1")): 8.0, ("wing", _text("p2")): 3.0,
    })
    cfg = CandidateConfig(student_top_n=1, min_score_percentile=34.0,
                          teacher_signal="cross_encoder")

    result = score_and_filter(queries, candidates, PASSAGES, teacher, cfg)

    assert len(teacher.scored) == 3 + 2 + 2  # no source to append for the supplied queries
    assert [q.id for q in result.kept] == ["log1", "gen"]
    log1 = next(s for s in result.lists if s.query_id == "log1")
    assert log1.passage_ids == ["p4", "p3", "p5"] and log1.raw_scores == [6.0, 2.0, 1.0]
    # Best scores 6, 0.5, 8: the weakest query falls under the floor, supplied or not.
    assert result.summary["dropped"] == {"low_score": 1}
    assert result.summary["by_type"]["supplied"] == {"generated": 2, "kept": 1, "low_score": 1}
    assert result.summary["teacher_check"]["queries"] == 1  # only queries with a source
    assert result.relabeled == []


def test_normalisation_uses_percentiles_and_clips() -> None:
    queries = [Query("q", "wing", source_id="p1")]
    pool = ["p1", "p2", "p3", "p4", "p5"]
    teacher = TableTeacher({("wing", _text(pid)): float(s)
                            for pid, s in zip(pool, [100, 3, 2, 1, -100], strict=True)})
    cfg = CandidateConfig(norm_low_percentile=25.0, norm_high_percentile=75.0,
                          min_score_percentile=0.0, teacher_signal="cross_encoder")
    result = score_and_filter(queries, {"q": _cand("q", pool, pool)}, PASSAGES, teacher, cfg)
    # The 25th/75th percentiles of the scores are 1 and 3: 100 clips to 1, -100 to 0, 2 -> 0.5.
    assert result.lists[0].teacher_scores == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])


def test_fused_signal_lets_first_stage_evidence_break_a_close_teacher_call() -> None:
    queries = [Query("q", "wing", source_id="p1")]
    # The first stage agrees on p1 (rank 1 in the fused list); the teacher slightly prefers p2.
    candidates = {"q": _cand("q", ["p1", "p2", "p3"], ["p1", "p2", "p3"])}
    teacher = TableTeacher({("wing", _text("p1")): 5.0, ("wing", _text("p2")): 5.2,
                            ("wing", _text("p3")): 0.0})
    plain = CandidateConfig(min_score_percentile=0.0, teacher_signal="cross_encoder")
    fused = CandidateConfig(min_score_percentile=0.0, teacher_signal="fused",
                            fused_teacher_weight=0.5)

    assert score_and_filter(queries, candidates, PASSAGES, teacher, plain).kept == []
    result = score_and_filter(queries, candidates, PASSAGES, teacher, fused)
    assert [q.id for q in result.kept] == ["q"]
    assert result.lists[0].passage_ids == ["p1", "p2", "p3"]
    assert result.lists[0].raw_scores == pytest.approx([5.0, 5.2, 0.0])  # raw scores as-is
    assert result.summary["teacher_signal"] == "fused"


def test_round_trip_can_be_switched_off() -> None:
    queries = [Query("q", "heat", source_id="p3")]
    candidates = {"q": _cand("q", ["p3", "p4"], ["p3", "p4"], source_rank=None)}
    teacher = TableTeacher({("heat", _text("p4")): 5.0, ("heat", _text("p3")): 1.0})
    cfg = CandidateConfig(round_trip=False, min_score_percentile=0.0,
                          teacher_signal="cross_encoder")
    result = score_and_filter(queries, candidates, PASSAGES, teacher, cfg)
    assert result.lists[0].passage_ids == ["p3", "p4"]  # the source stays the positive


CHUNKED = [
    Passage("d1#0", "wing wing shock", parent_id="d1"),
    Passage("d1#1", "wing flutter", parent_id="d1"),
    Passage("d1#2", "wing plate", parent_id="d1"),
    Passage("d2", "heat plate"),
    Passage("d3", "heat heat noise"),
]


def test_document_round_trip_keeps_a_query_whose_teacher_first_is_a_sibling_chunk() -> None:
    queries = [
        # The teacher puts d1#1 (same document) first: kept under "document", d1#1 the positive.
        Query("sibling", "wing", "questions", source_id="d1#0"),
        # Another document first: dropped under both scopes, relabelled.
        Query("other", "heat", "claims", source_id="d1#2"),
        # The student never retrieves the source, only a sibling chunk: the document check passes.
        Query("student_sibling", "flutter", "titles", source_id="d1#0"),
        # A sibling's score ties the source's: the source stays the positive.
        Query("tie", "shock", "titles", source_id="d1#0"),
    ]
    candidates = {
        "sibling": _cand("sibling", ["d1#1", "d1#0", "d2"], ["d1#1", "d1#0", "d2"], source_rank=2),
        "other": _cand("other", ["d2", "d1#2"], ["d2", "d1#2"], source_rank=2),
        "student_sibling": _cand("student_sibling", ["d1#1", "d3"], ["d1#1", "d3", "d2"],
                                 source_rank=None),
        "tie": _cand("tie", ["d1#0", "d1#1", "d3"], ["d1#0", "d1#1", "d3"], source_rank=1),
    }
    def t(pid: str) -> str:
        return _text(pid, CHUNKED)

    teacher = TableTeacher({
        ("wing", t("d1#0")): 6.0, ("wing", t("d1#1")): 8.0, ("wing", t("d2")): 1.0,
        ("heat", t("d2")): 7.0, ("heat", t("d1#2")): 2.0,
        ("flutter", t("d1#1")): 9.0, ("flutter", t("d3")): 0.0, ("flutter", t("d1#0")): 3.0,
        ("shock", t("d1#0")): 5.0, ("shock", t("d1#1")): 5.0, ("shock", t("d3")): 1.0,
    })
    passage_cfg = CandidateConfig(student_top_n=2, min_score_percentile=0.0,
                                  teacher_signal="cross_encoder")
    document_cfg = passage_cfg.model_copy(update={"round_trip_scope": "document"})

    by_passage = score_and_filter(queries, candidates, CHUNKED, teacher, passage_cfg)
    assert [q.id for q in by_passage.kept] == ["tie"]
    assert by_passage.summary["dropped"] == {"round_trip_teacher": 3}
    assert by_passage.summary["positive_moved"] == 0

    by_document = score_and_filter(queries, candidates, CHUNKED, teacher, document_cfg)
    assert [q.id for q in by_document.kept] == ["sibling", "student_sibling", "tie"]
    lists = {scored.query_id: scored for scored in by_document.lists}
    # The teacher's best chunk of the document leads; the source stays in the list behind it.
    assert lists["sibling"].passage_ids == ["d1#1", "d1#0", "d2"]
    assert lists["sibling"].raw_scores == [8.0, 6.0, 1.0]
    assert lists["student_sibling"].passage_ids == ["d1#1", "d3", "d1#0"]
    assert lists["tie"].passage_ids == ["d1#0", "d1#1", "d3"]
    summary = by_document.summary
    assert summary["dropped"] == {"round_trip_teacher": 1}
    assert summary["round_trip_scope"] == "document" and summary["positive_moved"] == 2
    assert [r.query_id for r in by_document.relabeled] == ["other"]
    assert by_document.relabeled[0].passage_ids[0] == "d2"


def test_document_round_trip_still_needs_the_document_in_the_students_top_n() -> None:
    queries = [Query("q", "wing", source_id="d1#0")]
    # Only d1#2, at rank 3, of the document is in the student's list; top 2 misses it.
    candidates = {"q": _cand("q", ["d1#0", "d2"], ["d2", "d3", "d1#2"], source_rank=None)}
    teacher = TableTeacher({("wing", _text("d1#0", CHUNKED)): 9.0,
                            ("wing", _text("d2", CHUNKED)): 1.0})
    cfg = CandidateConfig(student_top_n=2, min_score_percentile=0.0,
                          teacher_signal="cross_encoder", round_trip_scope="document")
    result = score_and_filter(queries, candidates, CHUNKED, teacher, cfg)
    assert result.kept == [] and result.summary["dropped"] == {"round_trip_student": 1}
    wider = cfg.model_copy(update={"student_top_n": 3})
    assert [q.id for q in score_and_filter(queries, candidates, CHUNKED, teacher, wider).kept] \
        == ["q"]


def test_teacher_agreement_compares_source_ranks_over_the_same_pool() -> None:
    queries = [Query("a", "x", source_id="p1"), Query("b", "y", source_id="p2")]
    candidates = {
        "a": _cand("a", ["p3", "p1"], ["p3", "p1"], ["p1", "p3"]),
        "b": _cand("b", ["p2", "p3"], ["p2", "p3"], ["p3"]),
    }
    raw = {"a": {"p3": 1.0, "p1": 2.0}, "b": {"p2": 0.0, "p3": 1.0}}

    check = teacher_agreement(queries, candidates, raw)

    assert check["queries"] == 2
    assert check["teacher"] == pytest.approx((1 + 1 / 2) / 2)
    assert check["student"] == pytest.approx((1 / 2 + 1) / 2)
    assert check["bm25"] == pytest.approx((1 + 1 / 2) / 2)  # p2 unlisted by BM25: ranked last
    assert check["teacher_top1"] == pytest.approx(0.5)


def test_split_by_passage_is_seeded_proportional_and_order_free() -> None:
    ids = [f"p{i}" for i in range(100)]
    split = split_by_passage(ids, {"train": 0.9, "dev": 0.1}, seed=3)

    assert Counter(split.values()) == {"train": 90, "dev": 10}
    assert split == split_by_passage(list(reversed(ids)), {"train": 0.9, "dev": 0.1}, seed=3)
    assert split != split_by_passage(ids, {"train": 0.9, "dev": 0.1}, seed=4)


def test_split_by_passage_gives_every_split_one_and_keeps_groups_together() -> None:
    ids = ["a", "b", "c"]
    assert sorted(split_by_passage(ids, {"train": 0.95, "dev": 0.05}, seed=0).values()) == [
        "dev", "train", "train"
    ]
    chunks = [f"doc{d}#{c}" for d in range(10) for c in range(3)]
    groups = {cid: cid.split("#")[0] for cid in chunks}
    split = split_by_passage(chunks, {"test": 0.2, "train": 0.8}, seed=1, groups=groups)
    for d in range(10):
        assert len({split[f"doc{d}#{c}"] for c in range(3)}) == 1
    assert Counter(split.values()) == {"train": 24, "test": 6}


def test_filter_runs_on_the_tiny_models(registry) -> None:
    from ml_core.student import Student
    from ml_core.teacher import load_teacher

    student = Student.load(registry.get("tiny-student"))
    teacher = load_teacher(registry.get("tiny-teacher"), registry)
    passages = [Passage(f"d{i}", text) for i, text in enumerate([
        "the wing flutter at high speed", "heat transfer in a flat plate",
        "shock waves on a wing", "noise from jet engines", "boundary layer on a plate",
    ])]
    queries = [Query(f"q{i}", p.text.split(" ", 2)[-1], "titles", source_id=p.id)
               for i, p in enumerate(passages)]
    cfg = CandidateConfig(top_k=3, student_top_n=5, round_trip=False, min_score_percentile=0.0)

    mined = mine_candidates(queries, passages, student, cfg)
    result = score_and_filter(queries, mined, passages, teacher, cfg)

    assert len(result.lists) == len(queries)  # no filter on: every query kept
    for query, scored in zip(queries, result.lists, strict=True):
        assert scored.passage_ids[0] == query.source_id
        assert len(set(scored.passage_ids)) == len(scored.passage_ids) >= 3
        assert len(scored.raw_scores) == len(scored.teacher_scores) == len(scored.passage_ids)


def test_two_round_filter_scores_deep_candidates_only_for_queries_it_keeps() -> None:
    queries = [
        Query("kept", "wing", source_id="p1"),
        Query("lost_early", "heat", source_id="p3"),
        Query("lost_deep", "flutter", source_id="p2"),
    ]
    deep = {
        "kept": ["p1", "p2", "p3", "p4"],
        "lost_early": ["p3", "p4", "p1", "p2"],
        "lost_deep": ["p2", "p1", "p5", "p4"],
    }
    candidates = {qid: _cand(qid, ids, ids) for qid, ids in deep.items()}
    texts = {q.id: q.text for q in queries}
    scores = {
        "kept": [9.0, 1.0, 2.0, 3.0],
        "lost_early": [2.0, 6.0, 0.0, 1.0],  # p4 beats the source inside the first round
        "lost_deep": [7.0, 3.0, 8.0, 0.0],  # p5, below the first round, beats the source
    }
    table = {(texts[qid], _text(pid)): s
             for qid, ids in deep.items() for pid, s in zip(ids, scores[qid], strict=True)}
    base = {"top_k": 4, "min_score_percentile": 0.0, "teacher_signal": "cross_encoder"}

    one_round = TableTeacher(table)
    full = score_and_filter(queries, candidates, PASSAGES, one_round, CandidateConfig(**base))
    two_rounds = TableTeacher(table)
    cheap = score_and_filter(queries, candidates, PASSAGES, two_rounds,
                             CandidateConfig(**base, filter_depth=2))

    # Same decisions and lists as scoring everything, for fewer pairs: the early loser's two
    # deep candidates are never scored. (The normalised scores differ a little: the
    # percentiles see only what was scored.)
    assert [q.id for q in full.kept] == [q.id for q in cheap.kept] == ["kept"]
    for lists in (full.lists, cheap.lists):
        assert lists[0].passage_ids == ["p1", "p2", "p3", "p4"]
        assert lists[0].raw_scores == [9.0, 1.0, 2.0, 3.0]
    assert len(one_round.scored) == 12 and len(two_rounds.scored) == 10
    assert sorted(two_rounds.scored) == sorted(set(two_rounds.scored))  # nothing twice
    assert ("heat", _text("p1")) not in two_rounds.scored
    assert cheap.summary["dropped"] == full.summary["dropped"] == {"round_trip_teacher": 2}
    assert cheap.summary["pairs_scored"] == 10 and cheap.summary["first_round_drops"] == 1
    assert (cheap.summary["filter_depth"], full.summary["filter_depth"]) == (2, 4)
    # The early loser's relabelled list holds what the first round scored.
    relabeled = {r.query_id: r for r in cheap.relabeled}
    assert relabeled["lost_early"].passage_ids == ["p4", "p3"]
    assert relabeled["lost_deep"].passage_ids[0] == "p5"


def test_filter_depth_must_not_exceed_top_k() -> None:
    with pytest.raises(ValueError, match="filter_depth"):
        CandidateConfig(top_k=16, filter_depth=32)
    assert CandidateConfig(top_k=32, filter_depth=16).filter_depth == 16
