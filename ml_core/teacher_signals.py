"""The training target's signal: teacher scores normalised, several teachers averaged, and
the blend with the first stage's rank evidence (candidates.teacher_signal; docs/benchmarks.md,
"Teacher signal" and "Late-interaction teacher")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ml_core.config import CandidateConfig

if TYPE_CHECKING:
    from ml_core.candidates import Candidates

# Signals that blend the teacher(s) with the first stage's rank evidence.
FUSED_SIGNALS = ("fused", "teachers_fused")


def minmax(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """(values - low) / (high - low), unclipped; all ones when the span is empty."""
    return (values - low) / (high - low) if high > low else np.ones_like(values)


def teacher_signal(
    passage_ids: Sequence[str],
    raw_scores: np.ndarray,
    candidates: Candidates,
    low: float,
    high: float,
    cfg: CandidateConfig,
) -> np.ndarray:
    """The training target's signal for one query's scored passages: the raw teacher scores
    min-max normalised between `low` and `high` (percentiles of all queries' raw scores); with
    cfg.teacher_signal "fused" or "teachers_fused", fused_teacher_weight x that + (1 - weight)
    x the passages' RRF evidence (0 for a passage outside the fused top-k) min-max scaled within
    the list. For the "teachers" signals `raw_scores` are already the teachers' average
    (combine_teachers). Unclipped: decisions on it would see clipped top scores as ties."""
    signal = minmax(np.asarray(raw_scores, dtype=np.float64), low, high)
    if cfg.teacher_signal in FUSED_SIGNALS:
        rrf = dict(zip(candidates.passage_ids, candidates.rrf, strict=True))
        evidence = np.array([rrf.get(pid, 0.0) for pid in passage_ids])
        spread = evidence.max() - evidence.min()
        evidence = (evidence - evidence.min()) / spread if spread > 0 else evidence * 0
        w = cfg.fused_teacher_weight
        signal = w * signal + (1 - w) * evidence
    return signal


def percentiles(raw_by_query: Mapping[str, Mapping[str, float]], cfg: CandidateConfig
                ) -> tuple[float, float]:
    """(low, high): cfg's norm_low/high percentiles of every score ((0, 1) when none)."""
    values = [v for scores in raw_by_query.values() for v in scores.values()]
    if not values:
        return 0.0, 1.0
    return (float(np.percentile(values, cfg.norm_low_percentile)),
            float(np.percentile(values, cfg.norm_high_percentile)))


def combine_teachers(
    raw_by_teacher: Sequence[Mapping[str, Mapping[str, float]]], cfg: CandidateConfig
) -> dict[str, dict[str, float]]:
    """{query id: {passage id: score}}: each teacher's raw scores min-max normalised between its
    own cfg.norm_low/high percentiles (unclipped), averaged over the teachers. Their scales
    differ (a cross-encoder's logits, a late-interaction teacher's sums of cosines), so each is
    brought to the same range before they vote. Pairs are those the first teacher scored."""
    spans = [percentiles(raw, cfg) for raw in raw_by_teacher]
    first = raw_by_teacher[0]
    return {
        qid: {
            pid: float(np.mean([minmax(np.array(raw[qid][pid]), low, high)
                                for raw, (low, high) in zip(raw_by_teacher, spans, strict=True)]))
            for pid in scores
        }
        for qid, scores in first.items()
    }
