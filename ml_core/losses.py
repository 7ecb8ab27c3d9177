"""Training losses: listwise distillation from a cross-encoder teacher plus a small InfoNCE term.

Reference: Tamber, Kazi, Sourabh, Lin et al. 2025, "Teaching Dense Retrieval Models to Specialize
with Listwise Distillation and LLM Data Augmentation" (arXiv 2502.19712), and the follow-up
"Conventional Contrastive Learning Often Falls Short" (arXiv 2505.19274); the recipe and its
settings are in docs/recipe.md.

Layout shared by every loss here (sentence-transformers style, `compute_loss_from_embeddings`):

- `queries`: [B, d] query embeddings.
- `passages`: [B * L, d] passage embeddings, list by list: rows i*L .. i*L+L-1 are query i's list
  and row i*L is its positive (the source passage).
- `teacher_scores`: [B, L] normalised teacher scores aligned with the lists.
- `passage_ids`: [B, L] integer keys (see `passage_keys`) or the lists' string ids, so that the
  same passage appearing in several lists of one batch can be recognised.

Embeddings are L2-normalised inside the losses, so scores are cosine similarities whether or not
the student normalises its output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ml_core.config import TrainingConfig

PassageIds = Tensor | Sequence[Sequence[str]]


def passage_keys(
    passage_ids: Sequence[Sequence[str]], device: torch.device | None = None
) -> Tensor:
    """Map lists of string passage ids to a [B, L] int64 tensor; equal ids get equal keys."""
    vocabulary: dict[str, int] = {}
    rows = [[vocabulary.setdefault(pid, len(vocabulary)) for pid in row] for row in passage_ids]
    return torch.tensor(rows, dtype=torch.long, device=device)


def _as_keys(passage_ids: PassageIds, device: torch.device) -> Tensor:
    if isinstance(passage_ids, Tensor):
        return passage_ids.to(device)
    return passage_keys(passage_ids, device)


def _list_scores(queries: Tensor, passages: Tensor) -> Tensor:
    """Cosine similarity of each query with the passages of its own list: [B, L]."""
    batch = queries.shape[0]
    q = F.normalize(queries, dim=-1)
    p = F.normalize(passages, dim=-1).view(batch, -1, passages.shape[-1])
    return torch.einsum("bd,bld->bl", q, p)


class ListwiseDistillationLoss(nn.Module):
    """KL(teacher || student) over each query's candidate list, averaged over queries.

    Student distribution: softmax(cosine / student_temperature) over the list; teacher
    distribution: softmax(normalised teacher score / teacher_temperature). Tamber et al. 2025
    (arXiv 2502.19712) use 0.05 and 0.3: the teacher's [0, 1] scores need a much softer
    temperature than cosines to give a comparably peaked distribution. The recipe's default
    teacher temperature is 0.1 (TrainingConfig): our lists hold only hard candidates.
    """

    def __init__(self, student_temperature: float = 0.05, teacher_temperature: float = 0.3) -> None:
        super().__init__()
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature

    def compute_loss_from_embeddings(
        self, queries: Tensor, passages: Tensor, teacher_scores: Tensor
    ) -> Tensor:
        """Returns the scalar mean KL divergence over the B lists."""
        student_logits = _list_scores(queries, passages) / self.student_temperature
        teacher_logits = teacher_scores.to(student_logits) / self.teacher_temperature
        return F.kl_div(
            F.log_softmax(student_logits, dim=-1),
            F.log_softmax(teacher_logits, dim=-1),
            log_target=True,
            reduction="batchmean",  # sum over the list, mean over queries
        )

    def forward(self, queries: Tensor, passages: Tensor, teacher_scores: Tensor) -> Tensor:
        return self.compute_loss_from_embeddings(queries, passages, teacher_scores)


class InfoNCELoss(nn.Module):
    """InfoNCE with every passage of the batch as a candidate (van den Oord et al. 2018).

    For query i the positive is its own list's first passage; the negatives are all other
    passages of the batch (its own mined candidates and every other list's passages), except:

    - duplicates of the positive: any other slot holding the positive's passage id (the same
      passage sampled for two queries, or the positive mined as another query's candidate) is
      removed, since an identical passage cannot be both the answer and a negative;
    - when `false_negative_ratio` is set and teacher scores are given, the query's own candidates
      whose teacher score exceeds ratio x the positive's teacher score (the "60% threshold" of
      Tamber et al. 2025): the teacher says they are probably relevant too.

    Removal means a logit of -inf, so the candidate drops out of the softmax.
    """

    def __init__(self, temperature: float = 0.01, false_negative_ratio: float | None = 0.6) -> None:
        super().__init__()
        self.temperature = temperature
        self.false_negative_ratio = false_negative_ratio

    def negative_mask(
        self, passage_ids: PassageIds, teacher_scores: Tensor | None, device: torch.device
    ) -> Tensor:
        """Returns a bool [B, B*L] mask: True where a passage is not a negative of the query."""
        keys = _as_keys(passage_ids, device)
        batch, list_size = keys.shape
        flat = keys.reshape(-1)
        positive_column = torch.arange(batch, device=device) * list_size
        is_positive = torch.zeros(batch, batch * list_size, dtype=torch.bool, device=device)
        is_positive[torch.arange(batch, device=device), positive_column] = True
        # Same passage id as the query's positive, anywhere in the batch, except the positive slot.
        mask = (flat.unsqueeze(0) == keys[:, :1]) & ~is_positive
        if self.false_negative_ratio is not None and teacher_scores is not None:
            scores = teacher_scores.to(device)
            own = scores > self.false_negative_ratio * scores[:, :1]
            own[:, 0] = False  # the positive itself is never a negative to remove
            rows = torch.arange(batch, device=device).unsqueeze(1)
            columns = positive_column.unsqueeze(1) + torch.arange(list_size, device=device)
            mask[rows, columns] |= own
        return mask

    def compute_loss_from_embeddings(
        self,
        queries: Tensor,
        passages: Tensor,
        passage_ids: PassageIds,
        teacher_scores: Tensor | None = None,
    ) -> Tensor:
        """Returns the scalar mean cross-entropy of each query's positive against the batch."""
        batch = queries.shape[0]
        list_size = passages.shape[0] // batch
        q = F.normalize(queries, dim=-1)
        p = F.normalize(passages, dim=-1)
        logits = q @ p.T / self.temperature
        mask = self.negative_mask(passage_ids, teacher_scores, queries.device)
        logits = logits.masked_fill(mask, float("-inf"))
        targets = torch.arange(batch, device=queries.device) * list_size
        return F.cross_entropy(logits, targets)

    def forward(
        self,
        queries: Tensor,
        passages: Tensor,
        passage_ids: PassageIds,
        teacher_scores: Tensor | None = None,
    ) -> Tensor:
        return self.compute_loss_from_embeddings(queries, passages, passage_ids, teacher_scores)


def anchor_distance(reps: Tensor, base_reps: Tensor) -> Tensor:
    """Mean squared distance between each row's normalised vector and the base model's vector
    for the same text (2 - 2 x their cosine: 0 where the two agree, at most 4)."""
    return (F.normalize(reps, dim=-1) - F.normalize(base_reps.to(reps), dim=-1)).square().sum(
        -1).mean()


class DistillationObjective(nn.Module):
    """The training objective chosen by `TrainingConfig.loss`.

    - "listwise" (the recipe): KL(teacher || student) + infonce_weight x InfoNCE, where InfoNCE
      uses the 60% false-negative mask and the duplicate-positive mask (Tamber et al. 2025).
    - "infonce": the plain contrastive baseline the recipe warns about (arXiv 2505.19274): the
      positive against in-batch + mined negatives, no teacher in the loss at all, so no
      false-negative filter. Exact duplicates of the positive are still removed: that is not
      de-noising but avoiding a contradictory target (the same passage as positive and negative).
      It exists to show customers why we distil, not as a recommended setting.

    With `base_anchor` > 0 either objective adds base_anchor x the pull toward the base: the
    mean of `anchor_distance` over the queries and over the passages, given the starting
    model's vectors for the same texts (`base_queries`, `base_passages`).
    """

    def __init__(self, cfg: TrainingConfig) -> None:
        super().__init__()
        self.kind = cfg.loss
        self.kl = ListwiseDistillationLoss(cfg.kl_student_temperature, cfg.kl_teacher_temperature)
        ratio = cfg.false_negative_ratio if cfg.loss == "listwise" else None
        self.infonce = InfoNCELoss(cfg.infonce_temperature, ratio)
        self.infonce_weight = cfg.infonce_weight
        self.anchor_weight = cfg.base_anchor

    def compute_terms(
        self,
        queries: Tensor,
        passages: Tensor,
        teacher_scores: Tensor,
        passage_ids: PassageIds,
        base_queries: Tensor | None = None,
        base_passages: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Returns {"loss", "infonce"}, for the listwise objective "kl", and with a pull toward
        the base "anchor": scalar tensors."""
        if self.kind == "infonce":
            infonce = self.infonce(queries, passages, passage_ids, None)
            terms = {"loss": infonce, "infonce": infonce}
        else:
            kl = self.kl(queries, passages, teacher_scores)
            infonce = self.infonce(queries, passages, passage_ids, teacher_scores)
            terms = {"loss": kl + self.infonce_weight * infonce, "kl": kl, "infonce": infonce}
        if self.anchor_weight > 0:
            if base_queries is None or base_passages is None:
                raise ValueError("base_anchor needs the base model's vectors of the same texts")
            anchor = (anchor_distance(queries, base_queries)
                      + anchor_distance(passages, base_passages)) / 2
            terms["anchor"] = anchor
            terms["loss"] = terms["loss"] + self.anchor_weight * anchor
        return terms

    def compute_loss_from_embeddings(self, *args: Any, **kwargs: Any) -> Tensor:
        """Returns the scalar training loss: `compute_terms`'s "loss", same arguments."""
        return self.compute_terms(*args, **kwargs)["loss"]

    forward = compute_loss_from_embeddings
