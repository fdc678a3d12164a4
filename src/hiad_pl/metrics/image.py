"""Image AUROC and the image threshold from one score and one label per image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hiad_pl.metrics import curves
from hiad_pl.metrics.inputs import ArrayLike, Device, UndefinedMetricError

#: The results of :func:`image_metrics`.
IMAGE_METRICS = ("image_auroc", "image_threshold")


def image_metrics(
    prediction_scores: ArrayLike | Sequence[float],
    gt_labels: ArrayLike | Sequence[int],
    *,
    device: Device = "cpu",
) -> dict[str, float]:
    """Image AUROC and the threshold that maximises ``TPR - FPR`` (Youden's J)."""
    scores = torch.as_tensor(np.asarray(prediction_scores, dtype=np.float64), device=device).reshape(-1)
    labels = torch.as_tensor(np.asarray(gt_labels), device=device).reshape(-1)
    if scores.numel() != labels.numel():
        raise ValueError(
            f"prediction_scores has {scores.numel()} values but gt_labels has {labels.numel()}"
        )
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("prediction_scores contains NaN or infinite values")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"gt_labels must be 0 or 1, got values {sorted(set(labels.tolist()))}")
    num_anomalous = int(labels.sum())
    if num_anomalous in (0, labels.numel()):
        kind = "anomalous" if num_anomalous == 0 else "normal"
        raise UndefinedMetricError(IMAGE_METRICS, f"there is no {kind} image")
    fpr, tpr, thresholds = curves.roc_from_scores(scores, labels)
    # index 0 is the (0, 0) point above every score; its threshold is no score
    best = 1 + int(torch.argmax((tpr - fpr)[1:]))
    return {
        "image_auroc": curves.area(fpr, tpr),
        "image_threshold": float(thresholds[best]),
    }

