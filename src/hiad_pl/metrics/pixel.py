"""Pixel AUROC, average precision and best F1 over all maps, exact or binned, streamed image by image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.classification import BinaryPrecisionRecallCurve
from torchmetrics.utilities.data import dim_zero_cat

from hiad_pl.metrics import curves
from hiad_pl.metrics.binning import Binner, binned_thresholds, count_above, require_both_classes, scan_maps
from hiad_pl.metrics.inputs import (
    DEFAULT_NUM_THRESHOLDS,
    ArrayLike,
    Mode,
    num_pixels,
    pair_up,
    prepared_images,
    resolve_mode,
)

#: The results of :func:`pixel_metrics`.
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1", "seg_threshold")

class _PixelCurve(BinaryPrecisionRecallCurve):
    """torchmetrics' binary PR curve fed with raw scores and defect pixel indexes.

    Scores are used as given (no sigmoid, whatever their range). With a
    binner the update adds a histogram-built multi-threshold confusion matrix,
    identical to torchmetrics' own but one pass per image; without, the scores
    and targets are kept for an exact curve.
    """

    def __init__(self, binner: Binner | None) -> None:
        super().__init__(thresholds=None if binner is None else binner.thresholds, validate_args=False)
        self.binner = binner

    def update(self, scores: Tensor, defect_index: Tensor) -> None:
        """Add one image: flat scores and the flat indexes of its defect pixels."""
        if self.binner is None:
            target = torch.zeros(scores.numel(), dtype=torch.uint8, device=scores.device)
            target[defect_index] = 1
            self.preds.append(scores)
            self.target.append(target)
            return
        bins = self.binner(scores)
        size = self.binner.thresholds.numel() + 1
        predicted, true_positive = count_above(bins, size), count_above(bins[defect_index], size)
        num_defect = defect_index.numel()
        self.confmat[:, 1, 1] += true_positive
        self.confmat[:, 0, 1] += predicted - true_positive
        self.confmat[:, 1, 0] += num_defect - true_positive
        self.confmat[:, 0, 0] += scores.numel() - num_defect - (predicted - true_positive)

    def state(self) -> Tensor | tuple[Tensor, Tensor]:
        """Every score and its label, or the ``[T, 2, 2]`` counts at the binned thresholds (float64)."""
        if self.binner is None:
            return dim_zero_cat(self.preds), dim_zero_cat(self.target)
        return self.confmat.double()


def pixel_metrics(
    prediction_masks: Sequence[ArrayLike],
    gt_masks: Sequence[ArrayLike | None] | None,
    *,
    device: torch.device | str = "cpu",
    mode: Mode = "auto",
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
) -> dict[str, float]:
    """Pixel AUROC, AP, best F1 and its threshold (``seg_threshold``) over all maps."""
    device = torch.device(device)
    pairs = pair_up(prediction_masks, gt_masks)
    resolved = resolve_mode(mode, num_pixels(pairs), num_thresholds)
    scan = scan_maps(pairs, device, sample=resolved == "binned")
    require_both_classes(scan, PIXEL_METRICS)
    binner = None
    if resolved == "binned":
        levels = torch.linspace(0, 1, num_thresholds // 2, dtype=torch.float64)
        binner = Binner(binned_thresholds(scan, num_thresholds, levels), scan.low, scan.high)
    curve = _PixelCurve(binner).to(device)
    for image in prepared_images(pairs, device):
        curve.update(image.scores.to(scan.dtype), image.defect_index)
    state = curve.state()
    if isinstance(state, tuple):  # every score: exact curves
        precision, recall, curve_thresholds = curves.pr_from_scores(*state)
        auroc = curves.area(*curves.roc_from_scores(*state)[:2])
    else:
        precision, recall = curves.pr_from_counts(state)
        assert curve.thresholds is not None  # a binned curve holds its thresholds
        curve_thresholds = curve.thresholds
        auroc = curves.area(*curves.roc_from_counts(state))
    f1 = torch.nan_to_num(2 * precision * recall / (precision + recall), nan=0.0)[:-1]
    best = int(torch.argmax(f1))
    return {
        "pixel_auroc": auroc,
        "pixel_ap": curves.average_precision(precision, recall),
        "pixel_f1": float(f1[best]),
        "seg_threshold": float(curve_thresholds[best]),
    }

