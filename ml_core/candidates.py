"""Candidate lists for synthetic queries, teacher scoring, and the round-trip filter.

Re-implements steps 4-8 of the recipe of Tamber et al. 2025 (arXiv 2502.19712): first-stage
candidates from the student fused with BM25 by reciprocal rank fusion, cross-encoder scores on the
fused top-k, the round-trip filter (the source passage must be the teacher's #1 and in the
student's top n), a percentile floor on the best teacher score, percentile min-max normalisation,
and the seeded split by source passage.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ml_core.config import CandidateConfig
from ml_core.records import Passage, ProgressFn, Query, ScoredList, no_progress
from ml_core.retrieval import BM25Index, DenseIndex, reciprocal_rank_fusion, rrf_scores
from ml_core.teacher_signals import combine_teachers, percentiles, teacher_signal

ENCODE_BATCH_SIZE = 64


class Encoder(Protocol):
    """What candidate mining needs from a student (ml_core.student.Student)."""

    def encode_queries(self, texts: list[str], batch_size: int = ...) -> np.ndarray: ...

    def encode_passages(self, passages: Any, batch_size: int = ...) -> np.ndarray: ...


class Scorer(Protocol):
    """What filtering needs from a teacher (ml_core.teacher.Teacher)."""

    def score(
        self, pairs: list[tuple[str, str]], batch_size: int = ..., progress: ProgressFn = ...
    ) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class Candidates:
    """One query's first-stage evidence.

    passage_ids: the fused top-k, best first, with their RRF scores in `rrf`; student_ids,
    bm25_ids and helper_ids (one list per helper retriever): each retriever's own list;
    source_rank: 1-based rank of the query's source passage in the student's list (None when
    the student did not retrieve it).
    """

    query_id: str
    passage_ids: list[str]
    rrf: list[float]
    student_ids: list[str]
    bm25_ids: list[str] = field(default_factory=list)
    source_rank: int | None = None
    helper_ids: list[list[str]] = field(default_factory=list)


@dataclass
class FilterResult:
    """What the filter kept: one ScoredList per kept query, the kept queries, and a summary.

    summary (JSON-ready): counts overall, per drop reason and per query type, thresholds, and the
    teacher check (how often teacher vs student put the source passage first).
    """

    lists: list[ScoredList]
    kept: list[Query]
    summary: dict[str, Any]
    # Every raw teacher score, kept or dropped: {query id: {passage id: logit}} (for audits and
    # for re-filtering with another teacher signal without scoring again).
    raw_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    # Queries dropped only because the teacher signal put another passage first, relabelled:
    # that passage is the list's positive (training may use them: training.relabel_disagreements).
    relabeled: list[ScoredList] = field(default_factory=list)
    # With co-teachers: each teacher's own raw scores, the job's teacher first (raw_scores then
    # holds their average after per-teacher normalisation).
    teacher_raw_scores: list[dict[str, dict[str, float]]] = field(default_factory=list)


def passage_text(passage: Passage) -> str:
    """Title + text as BM25 and the teacher see it (the title once, even if the text repeats it)."""
    title = passage.title.strip()
    if title and not passage.text.lower().startswith(title.lower()):
        return f"{title} {passage.text}"
    return passage.text


def mine_candidates(
    queries: Sequence[Query],
    passages: Sequence[Passage],
    student: Encoder,
    cfg: CandidateConfig,
    passage_vectors: np.ndarray | None = None,
    batch_size: int = ENCODE_BATCH_SIZE,
    helpers: Sequence[tuple[Encoder, np.ndarray | None]] = (),
    seed: int = 0,
) -> dict[str, Candidates]:
    """{query id: Candidates}: the student's top list fused with BM25's by RRF, cut to cfg.top_k.

    With cfg.easy_k the last easy_k of the top_k slots hold passages drawn (seeded by `seed`
    and the query id) from the student's and BM25's lists fused to cfg.easy_depth (helpers
    list only top_k), below the others, in rank order, with their RRF scores over those deeper
    lists; the others are the fused top as without them.

    The student list is max(top_k, student_top_n) deep so the round-trip filter can see the
    source passage's rank. `passage_vectors` (aligned with `passages`) skips re-encoding.
    `helpers` are (encoder, its passage vectors or None) for cfg.helpers: each one's dense
    top_k joins the fusion, after the student's and BM25's.
    """
    if not queries:
        return {}
    texts = [q.text for q in queries]
    ids = [p.id for p in passages]

    def dense_lists(encoder: Encoder, vectors: np.ndarray | None, depth: int) -> list[list[str]]:
        if vectors is None:
            vectors = encoder.encode_passages(list(passages), batch_size=batch_size)
        index = DenseIndex.build(vectors, ids)
        return index.search(encoder.encode_queries(texts, batch_size=batch_size), depth)[1]

    deep = cfg.easy_depth if cfg.easy_k else cfg.top_k
    student_lists = dense_lists(student, passage_vectors, max(deep, cfg.student_top_n))
    bm25_lists: list[list[str]] = [[] for _ in queries]
    if cfg.use_bm25:
        _, bm25_lists = BM25Index(passages).search(texts, deep)
    # helper_lists[h][i]: helper h's list for query i; per_query[i]: query i's helper lists.
    helper_lists = [dense_lists(encoder, vectors, cfg.top_k) for encoder, vectors in helpers]
    per_query = [list(lists) for lists in zip(*helper_lists, strict=True)] or [[] for _ in queries]

    result: dict[str, Candidates] = {}
    for query, student_ids, bm25_ids, helper_ids in zip(
        queries, student_lists, bm25_lists, per_query, strict=True
    ):
        bm25_ids, bm25_deep = bm25_ids[: cfg.top_k], bm25_ids
        rankings = [student_ids[: cfg.top_k]] + ([bm25_ids] if cfg.use_bm25 else []) + helper_ids
        hard = cfg.top_k - cfg.easy_k
        fused = reciprocal_rank_fusion(rankings, cfg.rrf_k)[:hard]
        scores = rrf_scores(rankings, cfg.rrf_k)
        rrf = [scores[pid] for pid in fused]
        if cfg.easy_k:
            deep_rankings = [student_ids] + ([bm25_deep] if cfg.use_bm25 else [])
            deep_scores = rrf_scores(deep_rankings, cfg.rrf_k)
            taken = set(fused)
            pool = [pid for pid in reciprocal_rank_fusion(deep_rankings, cfg.rrf_k)
                    if pid not in taken][: cfg.easy_depth - hard]
            rng = random.Random(f"{seed}:easy:{query.id}")
            ranks = sorted(rng.sample(range(len(pool)), min(cfg.easy_k, len(pool))))
            fused += [pool[i] for i in ranks]
            rrf += [deep_scores[pool[i]] for i in ranks]
        student_ids = student_ids[: max(cfg.top_k, cfg.student_top_n)]  # as deep as without easy
        in_student = query.source_id in student_ids
        source_rank = student_ids.index(query.source_id) + 1 if in_student else None
        result[query.id] = Candidates(
            query_id=query.id,
            passage_ids=fused,
            rrf=rrf,
            student_ids=student_ids,
            bm25_ids=bm25_ids,
            source_rank=source_rank,
            helper_ids=helper_ids,
        )
    return result


def _rank_in(order: Sequence[str], candidates: Iterable[str], target: str) -> int:
    """1-based rank of `target` among `candidates` ordered by `order`; unlisted ones go last."""
    position = {pid: i for i, pid in enumerate(order)}
    last = len(position)
    target_pos = position.get(target, last)
    return 1 + sum(
        1 for pid in candidates if pid != target and position.get(pid, last + 1) < target_pos
    )


def teacher_agreement(
    queries: Sequence[Query],
    candidates: Mapping[str, Candidates],
    raw_scores: Mapping[str, Mapping[str, float]],
) -> dict[str, Any]:
    """How well the teacher finds each query's source passage compared with the student.

    Over the same candidate set per query (the scored pairs), the MRR and top-1 rate of the
    source passage when ranked by the teacher, by the student, by BM25 and by the fused first
    stage. Computed before the round-trip filter (which keeps only the teacher's wins). Returns
    {"method", "metric": "mrr", "queries", "teacher", "student", "bm25", "fused",
    "teacher_top1", "student_top1"}.
    """
    ranks: dict[str, list[int]] = {"teacher": [], "student": [], "bm25": [], "fused": []}
    for query in queries:
        scores = raw_scores.get(query.id)
        cand = candidates.get(query.id)
        if not scores or cand is None or query.source_id not in scores:
            continue
        pool = list(scores)
        source = query.source_id
        ranks["teacher"].append(1 + sum(1 for pid in pool if scores[pid] > scores[source]))
        ranks["student"].append(_rank_in(cand.student_ids, pool, source))
        ranks["bm25"].append(_rank_in(cand.bm25_ids, pool, source))
        ranks["fused"].append(_rank_in(cand.passage_ids, pool, source))
    n = len(ranks["teacher"])

    def mrr(values: list[int]) -> float:
        return float(np.mean([1.0 / r for r in values])) if values else 0.0

    def top1(values: list[int]) -> float:
        return float(np.mean([r == 1 for r in values])) if values else 0.0

    return {
        "method": "synthetic_agreement",
        "metric": "mrr",
        "queries": n,
        "teacher": mrr(ranks["teacher"]),
        "student": mrr(ranks["student"]),
        "bm25": mrr(ranks["bm25"]),
        "fused": mrr(ranks["fused"]),
        "teacher_top1": top1(ranks["teacher"]),
        "student_top1": top1(ranks["student"]),
    }


@dataclass(frozen=True, slots=True)
class _Judgement:
    """One query's scored pool as the filter sees it: passage ids, raw scores and signal in
    scoring order, the list's positive, and the two round-trip checks."""

    pids: list[str]
    raw: np.ndarray
    signal: np.ndarray
    positive: int
    source_index: int
    teacher_lost: bool
    student_found: bool


def _judge(
    query: Query,
    scores: Mapping[str, float],
    cand: Candidates,
    by_id: Mapping[str, Passage],
    low: float,
    high: float,
    cfg: CandidateConfig,
) -> _Judgement:
    pids = list(scores)
    raw_values = np.array([scores[pid] for pid in pids])
    signal = teacher_signal(pids, raw_values, cand, low, high, cfg)
    if not query.source_id:
        # A supplied query (no source passage): the signal's #1 is its positive, and there is
        # no round trip to make.
        best = int(signal.argmax())
        return _Judgement(pids, raw_values, signal, best, best, False, True)
    source_index = pids.index(query.source_id)
    if cfg.round_trip_scope == "document":
        document = by_id[query.source_id].document_id
        same = np.array([by_id[pid].document_id == document for pid in pids])
        # The document's best chunk; the source passage itself on a tie.
        positive = int(max(np.flatnonzero(same), key=lambda i: (signal[i], i == source_index)))
        teacher_lost = bool(np.any(signal[~same] > signal[positive]))
        student_found = any(
            by_id[pid].document_id == document
            for pid in cand.student_ids[: cfg.student_top_n]
            if pid in by_id
        )
    else:
        positive = source_index
        teacher_lost = bool(np.any(signal > signal[source_index]))
        student_found = cand.source_rank is not None and cand.source_rank <= cfg.student_top_n
    return _Judgement(pids, raw_values, signal, positive, source_index, teacher_lost,
                      student_found)


def score_and_filter(
    queries: Sequence[Query],
    candidates: Mapping[str, Candidates],
    passages: Sequence[Passage] | Mapping[str, Passage],
    teacher: Scorer,
    cfg: CandidateConfig,
    progress: ProgressFn = no_progress,
    co_teachers: Sequence[Scorer] = (),
) -> FilterResult:
    """Teacher-scored, filtered candidate lists (see FilterResult).

    The teacher scores only each query's fused top-k plus its source passage when missing.
    A query without a source (source_id "": one the customer supplied, not generated) skips the
    round trip: the signal's #1 is its list's positive, and only "low_score" can drop it.
    Drop reasons, first that applies: "no_source" (source passage unknown), "round_trip_teacher"
    (source not ranked #1 by the teacher signal), "round_trip_student" (source not in the
    student's top cfg.student_top_n; with cfg.round_trip_scope == "document", both checks look
    for any chunk of the source's document, and the teacher's best such chunk is the list's
    positive), "low_score" (best raw teacher score under the
    cfg.min_score_percentile of all queries' best scores). The round-trip checks apply only
    when cfg.round_trip. Scores are min-max normalised between the norm_low/high percentiles of
    all raw scores and clipped to [0, 1]. With cfg.teacher_signal "fused", the signal is
    fused_teacher_weight x normalised teacher + (1 - weight) x the query's RRF evidence
    min-max scaled within its list, and the round trip uses that signal.

    With cfg.filter_depth under top_k (and the round trip on), scoring takes two rounds: the
    fused top filter_depth (plus the source) of every query first; a query whose source the
    signal does not put first there is dropped ("round_trip_teacher") without its deeper
    candidates being scored, and only the others get the rest of their top-k scored and the
    full decision. A deeper candidate can still beat the source in the second round and drop
    the query. Percentiles and the signal's normalisation then see every score of both rounds;
    a first-round drop's relabelled list, and its pool in the teacher check, hold its
    first-round pool only.

    `co_teachers` (for cfg.teacher_signal "teachers" and "teachers_fused") score the same pairs;
    every decision above then reads combine_teachers' average in place of the raw scores.
    """
    by_id = passages if isinstance(passages, Mapping) else {p.id: p for p in passages}
    scored_queries = [
        query for query in queries
        if candidates.get(query.id) is not None and (not query.source_id
                                                     or query.source_id in by_id)
    ]
    depth = cfg.filter_depth or cfg.top_k  # the config keeps it within top_k
    two_rounds = cfg.round_trip and depth < cfg.top_k
    scorers = [teacher, *co_teachers]
    raw_by_teacher: list[dict[str, dict[str, float]]] = [{} for _ in scorers]
    raw_by_query = raw_by_teacher[0]

    def score_pools(batch: Sequence[Query], limit: int, span: tuple[float, float]) -> int:
        """Scores each query's top `limit` (plus its source) not scored yet; returns the count."""
        pairs: list[tuple[str, str]] = []
        owners: list[tuple[str, str]] = []  # (query id, passage id) per pair
        for query in batch:
            pool = [*candidates[query.id].passage_ids[:limit], query.source_id or None]
            done = raw_by_teacher[0].get(query.id, {})
            for pid in dict.fromkeys(pool):
                if pid is not None and pid not in done:
                    pairs.append((query.text, passage_text(by_id[pid])))
                    owners.append((query.id, pid))
        step = (span[1] - span[0]) / len(scorers)
        for n, (scorer, raw_by) in enumerate(zip(scorers, raw_by_teacher, strict=True)):
            lo = span[0] + n * step
            progress(lo, f"teacher scoring {len(pairs)} pairs for {len(batch)} queries"
                         + (f" (teacher {n + 1} of {len(scorers)})" if co_teachers else ""))
            raw = (
                np.asarray(
                    scorer.score(pairs, batch_size=cfg.teacher_batch_size,
                                 progress=lambda f, m, lo=lo: progress(lo + step * f, m)),
                    dtype=np.float64,
                )
                if pairs
                else np.zeros(0)
            )
            if len(raw) != len(pairs):
                raise ValueError(f"teacher returned {len(raw)} scores for {len(pairs)} pairs")
            for (qid, pid), value in zip(owners, raw, strict=True):
                raw_by.setdefault(qid, {})[pid] = float(value)
        return len(pairs)

    def combined() -> dict[str, dict[str, float]]:
        return combine_teachers(raw_by_teacher, cfg) if co_teachers else raw_by_teacher[0]

    first_drops: set[str] = set()
    if two_rounds:
        pairs_scored = score_pools(scored_queries, depth, (0.0, 0.5))
        raw_by_query = combined()
        low, high = percentiles(raw_by_query, cfg)
        first_drops = {
            query.id for query in scored_queries
            if _judge(query, raw_by_query[query.id], candidates[query.id], by_id, low, high,
                      cfg).teacher_lost
        }
        pairs_scored += score_pools([q for q in scored_queries if q.id not in first_drops],
                                    cfg.top_k, (0.5, 1.0))
    else:
        pairs_scored = score_pools(scored_queries, cfg.top_k, (0.0, 1.0))

    raw_by_query = combined()
    low, high = percentiles(raw_by_query, cfg)
    best = np.array([max(raw_by_query[q.id].values()) for q in scored_queries])
    floor = float(np.percentile(best, cfg.min_score_percentile)) if len(best) else 0.0

    moved = 0  # kept queries whose positive is another chunk of the source's document
    lists: list[ScoredList] = []
    relabeled: list[ScoredList] = []
    kept: list[Query] = []
    reasons: dict[str, str] = {}
    for query in queries:
        scores = raw_by_query.get(query.id)
        if scores is None:
            known = not query.source_id or query.source_id in by_id
            reasons[query.id] = "no_candidates" if known else "no_source"
            continue
        j = _judge(query, scores, candidates[query.id], by_id, low, high, cfg)
        teacher_lost = j.teacher_lost or query.id in first_drops
        reason = None
        if cfg.round_trip and teacher_lost:
            reason = "round_trip_teacher"
        elif cfg.round_trip and not j.student_found:
            reason = "round_trip_student"
        elif j.raw.max() < floor:
            reason = "low_score"
        if reason == "round_trip_teacher" and j.raw.max() >= floor:
            relabeled.append(_scored_list(query.id, j.pids, j.signal, j.raw,
                                          int(j.signal.argmax())))
        if reason:
            reasons[query.id] = reason
            continue
        lists.append(_scored_list(query.id, j.pids, j.signal, j.raw, j.positive))
        kept.append(query)
        moved += int(j.positive != j.source_index)

    summary = {
        "generated": len(queries),
        "scored": len(scored_queries),
        "kept": len(kept),
        "relabeled": len(relabeled),
        "round_trip_scope": cfg.round_trip_scope,
        "positive_moved": moved,
        "pairs_scored": pairs_scored,
        "filter_depth": depth if two_rounds else cfg.top_k,
        "first_round_drops": len(first_drops),
        "dropped": dict(Counter(reasons.values())),
        "by_type": _counts_by_type(queries, reasons),
        "thresholds": {"min_top_score": floor, "norm_low": low, "norm_high": high},
        "teacher_signal": cfg.teacher_signal,
        "teachers": len(scorers),
        "teacher_check": teacher_agreement(scored_queries, candidates, raw_by_query),
    }
    progress(1.0, f"kept {len(kept)} of {len(queries)} queries")
    return FilterResult(
        lists=lists, kept=kept, summary=summary, raw_scores=raw_by_query, relabeled=relabeled,
        teacher_raw_scores=raw_by_teacher if co_teachers else [],
    )


def _scored_list(
    query_id: str, pids: list[str], signal: np.ndarray, raw: np.ndarray, positive: int
) -> ScoredList:
    """The positive, then the other candidates in first-stage (fused) rank order.

    As the recipe builds its lists ("the positive + the student's top candidates"): cutting a
    list to list_size keeps the first stage's best, not the teacher's near-duplicates of the
    positive, so the KL sees the full range of the teacher's judgements. Teacher scores are the
    signal clipped to [0, 1].
    """
    order = [positive, *(i for i in range(len(pids)) if i != positive)]
    clipped = np.clip(signal, 0.0, 1.0)
    return ScoredList(
        query_id=query_id,
        passage_ids=[pids[i] for i in order],
        teacher_scores=[float(clipped[i]) for i in order],
        raw_scores=[float(raw[i]) for i in order],
    )


def _counts_by_type(
    queries: Sequence[Query], reasons: Mapping[str, str]
) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for query in queries:
        row = counts.setdefault(query.query_type or "unknown", {"generated": 0, "kept": 0})
        row["generated"] += 1
        reason = reasons.get(query.id)
        if reason is None:
            row["kept"] += 1
        else:
            row[reason] = row.get(reason, 0) + 1
    return counts


def split_by_passage(
    ids: Iterable[str],
    fractions: Mapping[str, float],
    seed: int,
    groups: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """{passage id: split name}: a seeded split of passages by the given fractions.

    Fractions are relative (normalised to sum 1); counts use the largest remainder, and every
    split with a positive fraction gets at least one group when there are enough groups.
    `groups` (id -> group key, e.g. a chunk's document id) keeps a group in one split, so chunks
    of one document never straddle train and test. The result depends only on the set of ids.
    """
    ids = list(dict.fromkeys(ids))
    names = [name for name, share in fractions.items() if share > 0]
    if not names:
        raise ValueError("split fractions must include a positive share")
    keys = sorted({(groups or {}).get(pid, pid) for pid in ids})
    random.Random(seed).shuffle(keys)
    total = sum(fractions[name] for name in names)
    exact = [fractions[name] / total * len(keys) for name in names]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(names)), key=lambda i: -(exact[i] - counts[i]))
    for i in by_remainder[: len(keys) - sum(counts)]:
        counts[i] += 1
    if len(keys) >= len(names):
        for i in range(len(names)):
            while counts[i] == 0:
                donor = max(range(len(names)), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    assignment: dict[str, str] = {}
    start = 0
    for name, count in zip(names, counts, strict=True):
        for key in keys[start:start + count]:
            assignment[key] = name
        start += count
    return {pid: assignment[(groups or {}).get(pid, pid)] for pid in ids}
