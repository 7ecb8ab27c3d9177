"""The losses against numbers computed by hand (plain `math`, no torch) on tiny cases."""

from __future__ import annotations

import math

import pytest
import torch

from ml_core.config import TrainingConfig
from ml_core.losses import DistillationObjective, InfoNCELoss, ListwiseDistillationLoss

# Two queries, lists of three passages, 2-d embeddings given as angles (radians) so every cosine
# is cos(a - b). Passage rows: query 0's list = rows 0..2, query 1's list = rows 3..5.
QUERY_ANGLES = [0.0, 1.2]
# Candidate "b" (row 1) is almost as close to query 0 as its positive: a likely false negative.
PASSAGE_ANGLES = [0.1, 0.12, 0.9, 1.25, 1.0, 0.2]
TEACHER = [[1.0, 0.7, 0.2], [0.9, 0.5, 0.1]]
IDS = [["a", "b", "c"], ["d", "e", "f"]]


def _teacher() -> torch.Tensor:
    return torch.tensor(TEACHER, dtype=torch.float64)


def _unit(angles: list[float], scale: float = 1.0) -> torch.Tensor:
    # Non-unit length on purpose: the losses must use cosine, not the raw dot product.
    rows = [[scale * math.cos(a), scale * math.sin(a)] for a in angles]
    return torch.tensor(rows, dtype=torch.float64)


def _cos(q: int, p: int, passage_angles: list[float] = PASSAGE_ANGLES) -> float:
    return math.cos(QUERY_ANGLES[q] - passage_angles[p])


def _log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


def _hand_kl(teacher: list[list[float]], teacher_temperature: float = 0.3) -> float:
    total = 0.0
    for q in range(2):
        student = _log_softmax([_cos(q, 3 * q + j) / 0.05 for j in range(3)])
        target = _log_softmax([t / teacher_temperature for t in teacher[q]])
        total += sum(math.exp(t) * (t - s) for t, s in zip(target, student, strict=True))
    return total / 2


def _hand_infonce(
    removed: set[tuple[int, int]], passage_angles: list[float] = PASSAGE_ANGLES
) -> float:
    """Mean -log softmax of the positive (row 3q) over the batch minus the removed (q, row)."""
    total = 0.0
    for q in range(2):
        kept = [p for p in range(6) if (q, p) not in removed]
        logits = [_cos(q, p, passage_angles) / 0.01 for p in kept]
        total -= _log_softmax(logits)[kept.index(3 * q)]
    return total / 2


def test_listwise_kl_matches_hand_computation() -> None:
    loss = ListwiseDistillationLoss(0.05, 0.3).compute_loss_from_embeddings(
        _unit(QUERY_ANGLES, 2.0), _unit(PASSAGE_ANGLES, 0.5), _teacher()
    )
    assert loss.item() == pytest.approx(_hand_kl(TEACHER), rel=1e-9)


def test_kl_is_zero_when_student_distribution_equals_teacher() -> None:
    # Student logits cos/0.05 equal teacher logits t/0.3 exactly when t = 6 * cos.
    queries, passages = _unit(QUERY_ANGLES), _unit(PASSAGE_ANGLES)
    teacher = torch.tensor([[6 * _cos(q, 3 * q + j) for j in range(3)] for q in range(2)])
    loss = ListwiseDistillationLoss(0.05, 0.3).compute_loss_from_embeddings(
        queries, passages, teacher
    )
    assert abs(loss.item()) < 1e-9


def test_infonce_without_masks_uses_every_passage_of_the_batch() -> None:
    loss = InfoNCELoss(0.01, false_negative_ratio=None).compute_loss_from_embeddings(
        _unit(QUERY_ANGLES), _unit(PASSAGE_ANGLES), IDS
    )
    assert loss.item() == pytest.approx(_hand_infonce(set()), rel=1e-9)


def test_sixty_percent_threshold_removes_likely_positives_from_negatives() -> None:
    # Query 0: candidate "b" scores 0.7 > 0.6 x 1.0 -> removed; "c" (0.2) stays.
    # Query 1: 0.5 <= 0.6 x 0.9 = 0.54 -> nothing removed.
    loss = InfoNCELoss(0.01, false_negative_ratio=0.6).compute_loss_from_embeddings(
        _unit(QUERY_ANGLES), _unit(PASSAGE_ANGLES), IDS, _teacher()
    )
    expected = _hand_infonce({(0, 1)})
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    # The mask matters here: without it the loss is clearly different.
    assert abs(expected - _hand_infonce(set())) > 0.1


def test_threshold_only_applies_to_the_querys_own_list() -> None:
    mask = InfoNCELoss(0.01, 0.6).negative_mask(IDS, _teacher(), torch.device("cpu"))
    assert mask.tolist() == [
        [False, True, False, False, False, False],
        [False, False, False, False, False, False],
    ]


def test_duplicate_positive_is_masked_out_of_other_negatives() -> None:
    # Query 0's positive "a" was also mined as query 1's last candidate (row 5), and the same
    # passage has the same embedding wherever it appears.
    ids = [["a", "b", "c"], ["d", "e", "a"]]
    angles = PASSAGE_ANGLES[:5] + [PASSAGE_ANGLES[0]]
    loss = InfoNCELoss(0.01, false_negative_ratio=None).compute_loss_from_embeddings(
        _unit(QUERY_ANGLES), _unit(angles), ids
    )
    expected = _hand_infonce({(0, 5)}, angles)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    # Unmasked, the duplicate ties the positive's logit and query 0's loss jumps.
    assert _hand_infonce(set(), angles) - expected > 0.15


def test_duplicate_positives_of_two_queries_mask_each_other() -> None:
    # Two synthetic queries from the same source passage "a" in one batch.
    mask = InfoNCELoss(0.01, None).negative_mask(
        [["a", "b", "c"], ["a", "e", "f"]], None, torch.device("cpu")
    )
    assert mask.tolist() == [
        [False, False, False, True, False, False],
        [True, False, False, False, False, False],
    ]


def test_listwise_objective_is_kl_plus_weighted_masked_infonce() -> None:
    cfg = TrainingConfig(list_size=3, infonce_weight=0.1)  # the default temperatures
    terms = DistillationObjective(cfg).compute_terms(
        _unit(QUERY_ANGLES), _unit(PASSAGE_ANGLES), _teacher(), IDS
    )
    expected = _hand_kl(TEACHER, cfg.kl_teacher_temperature) + 0.1 * _hand_infonce({(0, 1)})
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-9)
    assert set(terms) == {"loss", "kl", "infonce"}


def test_infonce_baseline_ignores_the_teacher() -> None:
    cfg = TrainingConfig(loss="infonce")
    objective = DistillationObjective(cfg)
    queries, passages = _unit(QUERY_ANGLES), _unit(PASSAGE_ANGLES)
    loss = objective(queries, passages, _teacher(), IDS)
    other_teacher = objective(queries, passages, torch.zeros(2, 3), IDS)
    assert loss.item() == pytest.approx(_hand_infonce(set()), rel=1e-9)
    assert loss.item() == other_teacher.item()


def test_gradients_flow_to_both_sides() -> None:
    queries = _unit(QUERY_ANGLES).requires_grad_()
    passages = _unit(PASSAGE_ANGLES).requires_grad_()
    DistillationObjective(TrainingConfig())(queries, passages, _teacher(), IDS).backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    assert passages.grad is not None and passages.grad.abs().sum() > 0


def test_pull_toward_the_base_adds_the_mean_distance_of_each_side() -> None:
    """base_anchor adds weight x (mean over queries + mean over passages) / 2 of the squared
    distance between normalised vectors: 2 - 2 cos of the angle each text moved."""
    cfg = TrainingConfig(list_size=3, base_anchor=2.0)
    queries, passages = _unit(QUERY_ANGLES, scale=3.0), _unit(PASSAGE_ANGLES)
    moved_queries = [a + 0.3 for a in QUERY_ANGLES]  # the base put each query 0.3 rad away
    base_passages = _unit(PASSAGE_ANGLES, scale=0.5)  # same directions: no distance
    terms = DistillationObjective(cfg).compute_terms(
        queries, passages, _teacher(), IDS, _unit(moved_queries), base_passages)
    plain = DistillationObjective(TrainingConfig(list_size=3)).compute_terms(
        queries, passages, _teacher(), IDS)
    expected_anchor = ((2 - 2 * math.cos(0.3)) + 0.0) / 2
    assert terms["anchor"].item() == pytest.approx(expected_anchor, rel=1e-9)
    assert terms["loss"].item() == pytest.approx(
        plain["loss"].item() + 2.0 * expected_anchor, rel=1e-9)
    assert "anchor" not in plain


def test_pull_toward_the_base_moves_vectors_back_and_needs_the_base() -> None:
    cfg = TrainingConfig(list_size=3, base_anchor=1.0)
    objective = DistillationObjective(cfg)
    base_queries, base_passages = _unit(QUERY_ANGLES), _unit(PASSAGE_ANGLES)
    queries = _unit([a + 0.5 for a in QUERY_ANGLES]).requires_grad_()
    anchor = objective.compute_terms(queries, base_passages, _teacher(), IDS, base_queries,
                                     base_passages)["anchor"]
    anchor.backward()
    with torch.no_grad():  # a small step down the anchor's gradient turns each query back
        stepped = queries - 0.1 * queries.grad
    cosine = torch.nn.functional.cosine_similarity
    assert (cosine(stepped, base_queries) > cosine(queries, base_queries)).all()
    with pytest.raises(ValueError, match="base_anchor"):
        objective.compute_terms(queries, base_passages, _teacher(), IDS)
