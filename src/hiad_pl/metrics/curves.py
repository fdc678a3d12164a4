"""Binary ROC and precision-recall curves, their areas, from scores or from binned counts.

Two forms of the same curves:

- **exact**, from every score and its label (and optional weights): the counts of
  positives and negatives at or above each distinct score, highest score first;
- **binned**, from counts at fixed thresholds (``[T, 2, 2]`` confusion matrices, one
  per ascending threshold: ``[true class, predicted class]``), which streaming
  metrics accumulate in one pass per image.

The areas follow the usual conventions (scikit-learn's, torchmetrics'): AUROC is the
trapezoidal area under TPR(FPR); average precision is the step sum
``sum_n (R_n - R_{n-1}) P_n`` over the curve from the highest threshold down.
All arithmetic is float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cumulative_counts(scores: Tensor, target: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(false positives, true positives, thresholds)`` at each distinct score, highest first.

    Entry ``i`` counts the samples scoring at least ``thresholds[i]`` (weighted by
    ``weights`` when given).
    """
    scores = scores.reshape(-1)
    order = torch.argsort(scores, descending=True, stable=True)
    scores = scores[order]
    positive = target.reshape(-1)[order].to(torch.float64)
    weight = torch.ones_like(positive) if weights is None else weights.reshape(-1)[order].to(torch.float64)
    # the last position of each run of equal scores
    ends = torch.cat([torch.nonzero(scores[1:] != scores[:-1]).flatten(), scores.new_tensor([scores.numel() - 1]).long()])
    true_positives = (positive * weight).cumsum(0)[ends]
    false_positives = ((1 - positive) * weight).cumsum(0)[ends]
    return false_positives, true_positives, scores[ends]


def roc_from_scores(scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(fpr, tpr, thresholds)`` from (0, 0) upwards; the first threshold (no sample above it) is the top score + 1."""
    fps, tps, thresholds = cumulative_counts(scores, target)
    zero = fps.new_zeros(1)
    fpr = torch.cat([zero, fps]) / fps[-1]
    tpr = torch.cat([zero, tps]) / tps[-1]
    return fpr, tpr, torch.cat([thresholds[:1] + 1, thresholds])


def pr_from_scores(scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(precision, recall, thresholds)`` in ascending thresholds, ending with the point (1, 0) that has no threshold."""
    fps, tps, thresholds = cumulative_counts(scores, target)
    # lower thresholds than the first that reaches full recall add no recall
    stop = int(torch.nonzero(tps == tps[-1])[0]) + 1
    fps, tps, thresholds = fps[:stop], tps[:stop], thresholds[:stop]
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    one, zero = precision.new_ones(1), precision.new_zeros(1)
    return torch.cat([precision.flip(0), one]), torch.cat([recall.flip(0), zero]), thresholds.flip(0)


def roc_from_counts(confusion: Tensor) -> tuple[Tensor, Tensor]:
    """``(fpr, tpr)`` in ascending FPR from ``[T, 2, 2]`` counts at ascending thresholds."""
    confusion = confusion.to(torch.float64)
    tps, fps = confusion[:, 1, 1], confusion[:, 0, 1]
    fns, tns = confusion[:, 1, 0], confusion[:, 0, 0]
    return safe_divide(fps, fps + tns).flip(0), safe_divide(tps, tps + fns).flip(0)


def pr_from_counts(confusion: Tensor) -> tuple[Tensor, Tensor]:
    """``(precision, recall)`` at ascending thresholds, then the point (1, 0); an empty prediction has precision 1."""
    confusion = confusion.to(torch.float64)
    tps, fps, fns = confusion[:, 1, 1], confusion[:, 0, 1], confusion[:, 1, 0]
    precision = safe_divide(tps, tps + fps, empty=1.0)
    recall = safe_divide(tps, tps + fns)
    return torch.cat([precision, precision.new_ones(1)]), torch.cat([recall, recall.new_zeros(1)])


def area(x: Tensor, y: Tensor) -> float:
    """Trapezoidal area under ``y(x)`` for ``x`` in ascending order."""
    return float(torch.trapezoid(y, x))


def average_precision(precision: Tensor, recall: Tensor) -> float:
    """Step-sum area of a PR curve given at ascending thresholds (recall descending)."""
    return float(-torch.sum((recall[1:] - recall[:-1]) * precision[:-1]))


def safe_divide(numerator: Tensor, denominator: Tensor, empty: float = 0.0) -> Tensor:
    """``numerator / denominator``, ``empty`` where the denominator is 0."""
    zero = denominator == 0
    return torch.where(zero, torch.full_like(numerator, empty), numerator / torch.where(zero, 1.0, denominator))
